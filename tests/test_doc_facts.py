"""Where a document states what the code decides, the two agree: the study scales of experiments/README.md are
`tbps_clip.study.grid.SCALES`, and benchmarks/README.md says where each benchmark script writes its record."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_experiments_readme_states_the_scales_as_the_code_sets_them():
    "Each scale bullet of experiments/README.md names the scale's architecture, steps a run and learning rate."
    from tbps_clip.config import make_config
    from tbps_clip.study.grid import SCALES
    text = (ROOT / "experiments" / "README.md").read_text(encoding="utf-8")
    bullets = {m[1]: m[2] for m in re.finditer(r"^- `([\w-]+)` \((.*?)(?=^\S|^- |\Z)", text, re.M | re.S)}
    stated = {}
    for name, body in bullets.items():
        m = re.search(r"`(tbps-[\w-]+)`.*?(\d+) steps a run at lr (\d(?:\.\d+)?e-\d+)", " ".join(body.split()))
        if name in SCALES and m: stated[name] = (m[1], int(m[2]), float(m[3]))
    assert set(stated) == {"smoke", "study", "study-v2"}, sorted(bullets)
    for name, (arch, steps, lr) in stated.items():
        s = SCALES[name]
        assert (arch, steps, lr) == (s["arch"], s["steps"], s["overrides"]["optim.lr"]), (name, s)
    study = " ".join(bullets["study"].split())
    assert f"(batch {make_config('clip').data.batch_size}," in study and "data.batch_size" not in SCALES["study"]["overrides"]


def test_experiments_readme_lists_every_notebook_study_module_and_parameter_file():
    text = (ROOT / "experiments" / "README.md").read_text(encoding="utf-8")
    notebooks = {p.stem for p in (ROOT / "experiments").glob("e*.ipynb")}
    assert notebooks == set(re.findall(r"^\| `(e\d\d_\w+)` \|", text, re.M)), notebooks
    modules = {p.stem for p in (ROOT / "tbps_clip" / "study").glob("*.py")} - {"__init__"}
    assert modules == set(re.findall(r"^\| `study\.(\w+)` \|", text, re.M)), modules
    params = {p.name for p in (ROOT / "experiments" / "params").glob("*.yaml")}
    listed = text.split("Parameter files (`experiments/params/`):", 1)[1].split("\n\n", 1)[0]
    assert params == set(re.findall(r"`([\w-]+\.yaml)`", listed)), params


def test_benchmarks_readme_says_where_each_script_writes():
    "The table of benchmarks/README.md covers every script; 'machine record' is exactly bench_common.write_results."
    text = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([\w*]+\.py)` \| (.+?) \| (yes|no) \|$", text, re.M)
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")} - {"bench_common.py"}
    covered = set()
    for pattern, writes, machine in rows:
        files = sorted((ROOT / "benchmarks").glob(pattern))
        assert files, pattern
        for f in files:
            covered.add(f.name)
            src = f.read_text(encoding="utf-8")
            assert ("write_results(" in src) == (machine == "yes"), (f.name, machine)
            for path in re.findall(r"`((?:benchmarks/)?results/[^`<]+)`", writes):  # a named default path is the script's
                assert path in src, (f.name, path)
    assert covered == scripts, sorted(scripts ^ covered)


def test_architecture_page_lists_every_notebook_with_its_module():
    "docs/architecture.md's table names each notebook of nbs/ and the module nbdev exports it to."
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| \[([\w.]+\.ipynb)\]\(\.\./nbs/\1\) \| `([\w.]+|\(tutorial\))` \|", text, re.M))
    want = {}
    for nb in sorted((ROOT / "nbs").glob("*.ipynb")):
        m = re.search(r"#\|\s*default_exp\s+([\w.]+)", nb.read_text(encoding="utf-8"))
        want[nb.name] = "(tutorial)" if not m else "tbps_clip" if m[1] == "__init__" else f"tbps_clip.{m[1].removesuffix('.__init__')}"
    assert rows == want, sorted(set(rows.items()) ^ set(want.items()))
