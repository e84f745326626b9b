"""The notebooks are the library's source and its documentation: each must run top to bottom."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def nbdev_test_path() -> Path | None:
    "The `nbdev_test` installed beside the running interpreter (a venv need not be activated), or None without nbdev."
    exe = Path(sys.executable).parent / ("nbdev_test.exe" if os.name == "nt" else "nbdev_test")
    if exe.is_file(): return exe
    if importlib.util.find_spec("nbdev") is not None:  # the dev extra is installed: a missing script is a broken install
        pytest.fail(f"nbdev is importable but {exe} is missing; reinstall the dev extra (pip install -e '.[dev]')")
    return None


def test_notebooks_run():
    exe = nbdev_test_path()
    if exe is None: pytest.skip("nbdev is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # the interpreter's folder first, so that nbdev_test's own subprocesses find this environment's tools
    env["PATH"] = os.pathsep.join([str(exe.parent), env.get("PATH", "")])
    r = subprocess.run([str(exe), "--n_workers", "2", "--path", str(ROOT / "nbs")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]


def test_nbdev_test_found_beside_interpreter():
    "With the dev extra installed, the notebook test finds nbdev_test without an activated venv (never a silent skip)."
    if importlib.util.find_spec("nbdev") is None: pytest.skip("nbdev is not installed")
    exe = nbdev_test_path()
    assert exe is not None and exe.parent == Path(sys.executable).parent


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
