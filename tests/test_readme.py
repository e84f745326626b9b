"""The README's Python example runs as written (in a fresh folder, on the tiny model it names)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- tested by tests/test_readme.py -->"


def readme_example() -> str:
    "The python block that follows the README's test mark."
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.count(MARK) == 1, f"README.md must mark exactly one example with {MARK!r}"
    m = re.match(r"\s*```python\n(.*?)\n```", text.split(MARK, 1)[1], re.S)
    assert m, "the README's test mark must be followed by a ```python block"
    return m.group(1)


def test_readme_python_example_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    hits = re.findall(r"^Hit\(#(\d+), score -?[0-9.]+, (.+), entry \d+\)$", r.stdout, re.M)
    assert [int(n) for n, _ in hits] == [1, 2, 3, 4, 5], r.stdout[-3000:]
    assert all(Path(p).is_absolute() and Path(p).is_file() and tmp_path.resolve() in Path(p).parents for _, p in hits)
    assert r.stdout.count("'R@1'") == 2 and r.stdout.count("Encoder(tbps-micro") == 1
    assert (tmp_path / "runs/tiny/checkpoint.pt").is_file() and (tmp_path / "runs/tiny/index/index.json").is_file()
    assert (tmp_path / "top5.png").stat().st_size > 1000


def test_readme_demo_table_is_the_committed_demo_record():
    "The README's demo table and results/demo/results.json come from one run (issue 16, item 13)."
    import json
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("### What the main job prints", 1)[1].split("```", 2)[1]
    rows = {m.group(1): [float(x) for x in m.group(2).split()]
            for m in re.finditer(r"^(zero-shot|fine-tuned)\b.*?\)\s+([0-9. ]+)$", block, re.M)}
    rec = json.loads((ROOT / "results/demo/results.json").read_text())
    keys = ["R@1", "R@5", "R@10", "mAP", "mINP"]
    assert rows["zero-shot"] == [round(rec["zero_shot"][k], 2) for k in keys], (rows, rec["zero_shot"])
    assert rows["fine-tuned"] == [round(rec["metrics"][k], 2) for k in keys], (rows, rec["metrics"])
    assert f"{rec['steps']} fine-tuning steps" in block and rec["synthetic"] is True
