"""The notebooks are the library's source and its documentation: each must run top to bottom."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("nbdev_test") is None, reason="nbdev is not installed (pip install -e '.[dev]')")
def test_notebooks_run():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([shutil.which("nbdev_test"), "--n_workers", "2", "--path", str(ROOT / "nbs")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def test_library_imports_without_dev_tools():
    "The installed library must not need nbdev, papermill or Jupyter at run time."
    code = ("import sys, builtins\n"
            "real = builtins.__import__\n"
            "def guard(name, *a, **k):\n"
            "    if name.split('.')[0] in {'nbdev', 'fastcore', 'execnb', 'papermill', 'jupyter', 'IPython', 'seaborn', 'pandas', 'nbformat'}:\n"
            "        raise ImportError('dev-only module imported: ' + name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = guard\n"
            "import tbps_clip.cli, tbps_clip.run, tbps_clip.synthpedes, tbps_clip.search, tbps_clip.serve\n"
            "import tbps_clip.study.driver, tbps_clip.study.report, tbps_clip.study.grid\n"
            "tbps_clip.cli.build_parser()\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
