"""The README's Python example runs as written (in a fresh folder, on the tiny model it names), its measured numbers
(the demo table, the findings table) and those of docs/study.md (the study's effects and counts) are those of the
committed records, and its table of commands names every command."""
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
    "The README's demo table and results/demo/results.json come from one run."
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


STUDY = ROOT / "results" / "study" / "synthpedes-v3"
# docs/study.md's row labels -> (the report's paired table, its row label)
README_ROWS = {"+ Dropout": ("table1", "+ Dropout"), "+ LockBL": ("table1", "+ LockBL"), "+ SoftLabel": ("table1", "+ SoftLabel"),
               "CLIP* (all four)": ("table1", "CLIP* (all four)"),
               "TBPS-CLIP (the `tbps` preset)": ("table6_8-tbps-tiny-cs", "CUHK-PEDES TBPS-CLIP ViT-B/16"),
               "Simplified": ("table6_8-tbps-tiny-cs", "CUHK-PEDES Simplified ViT-B/16")}
README_TABLES = {"2": "table2", "3": "table3", "4": "table4", "5": "table5", "10": "table10", "12": "table12",
                 "11 (1%)": "table11-0.01", "11 (5%)": "table11-0.05", "11 (10%)": "table11-0.1", "batch size": "table12_batch",
                 "2 (appendix)": "table2_appendix", "3 (appendix)": "table3_appendix"}


def study_tables(tmp_path) -> dict:
    "The v3 report's paired tables, rebuilt from the committed records (no figures), by table name."
    sys.path.insert(0, str(ROOT / "experiments"))
    from tbps_clip.study.report import build_report
    from tbps_experiments import REPORT_SECTIONS
    tables = build_report([STUDY], tmp_path, figures=False, sections=REPORT_SECTIONS)
    return {t.removesuffix(" paired"): m for (_, t), m in tables.items() if t.endswith(" paired")}


def test_study_page_numbers_are_the_records(tmp_path):
    "Every paired effect, 2-SE figure and count of docs/study.md's v3 section is what the committed records give."
    from tbps_clip.study.marks import paired_summary
    text = (ROOT / "docs" / "study.md").read_text(encoding="utf-8").split("## The second analogue (v3)", 1)[1].split("## History", 1)[0]
    tables = study_tables(tmp_path)
    rows = re.findall(r"^\| ([^|]+?) \| [^|]* \| ([+-]?\d+\.\d\d) \((\d+\.\d\d)\) \|", text, re.M)
    assert {label for label, _, _ in rows} == set(README_ROWS), rows
    for label, effect, two_se in rows:
        table, name = README_ROWS[label]
        r = next(r for r in tables[table] if r["label"] == name)
        assert (float(effect), float(two_se)) == (round(r["ours_effect"], 2), round(r["resolvable"], 2)), (label, r)
    summary = re.findall(r"^\| (\d+(?: \((?:\d+%|appendix)\))?|batch size)[^|]*\| ([0-9.]+|unknown)[^|]*\| (\d+ of \d+|direction only)", text, re.M)
    assert {t for t, _, _ in summary} == set(README_TABLES), summary
    for t, smallest, resolved in summary:
        s = paired_summary(tables[README_TABLES[t]])
        assert smallest == ("unknown" if s["smallest_resolvable"] is None else f"{s['smallest_resolvable']:.2f}"), (t, s)
        assert resolved == ("direction only" if s["smallest_resolvable"] is None else f"{s['resolved']} of {s['rows']}"), (t, s)
    main = [paired_summary(tables[t]) for t in ("table1", "table2", "table3", "table4", "table5", "table6_8-tbps-tiny-cs", "table10",
                                                "table11-0.01", "table11-0.05", "table11-0.1", "table12")]
    said = re.search(r"In the main tables (\d+) rows resolve and (\d+) agree", text)
    assert said and (int(said[1]), int(said[2])) == (sum(s["resolved"] for s in main), sum(s["agree"] for s in main)), said
    appendix = [paired_summary(tables[t]) for t in ("table2_appendix", "table3_appendix")]
    said = re.search(r"In the appendix tables (\d+) rows resolve and (\d+) agree", text)
    assert said and (int(said[1]), int(said[2])) == (sum(s["resolved"] for s in appendix), sum(s["agree"] for s in appendix)), said


# the README's findings rows (paper tables) -> the report's paired tables they count
FINDINGS = {"1-5": ("table1", "table2", "table3", "table4", "table5"), "6-8": ("table6_8-tbps-tiny-cs",),
            "10-12": ("table10", "table11-0.01", "table11-0.05", "table11-0.1", "table12"),
            "2-3, appendix": ("table2_appendix", "table3_appendix")}


def test_readme_findings_table_is_the_records(tmp_path):
    "Each row of the README's findings table: its rows, and how many resolve and agree in v3, from the committed records."
    from tbps_clip.study.marks import paired_summary
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("## Findings (synthetic)", 1)[1].split("\n## ", 1)[0]
    header = re.search(r"^\| tables \(paper\) \|.*$", text, re.M)[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    v3 = cols.index("v3: resolve / agree")
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                          for line in text[text.index(header):].splitlines()[2:] if line.startswith("|"))}
    assert set(FINDINGS) <= set(rows), rows  # a row of another study (its own column or row) is its own test's
    tables = study_tables(tmp_path)
    for group, names in FINDINGS.items():
        s = [paired_summary(tables[n]) for n in names]
        said = rows[group]
        assert int(said[cols.index("rows")]) == sum(x["rows"] for x in s), (group, said)
        assert said[v3] == f"{sum(x['resolved'] for x in s)} / {sum(x['agree'] for x in s)}", (group, said, s)


def test_readme_is_short_and_its_commands_table_names_every_command():
    "The README is a front door (at most about 150 lines); its table of commands has a row for each `tbps-clip` command."
    from tbps_clip.cli import build_parser
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150, len(text.splitlines())
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `tbps-clip (\w+)", table, re.M))
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert named == set(sub.choices), sorted(named ^ set(sub.choices))
