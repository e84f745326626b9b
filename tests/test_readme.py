"""The README's Python example runs as written (in a fresh folder, on the tiny model it names), its measured numbers
(the demo table, the findings table) and those of docs/study.md (the study's effects and counts) are those of the
committed records, and its table of commands names every command."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def study_report(study: Path, tmp_path) -> tuple:
    "A study's report rebuilt from its committed records (no figures): its marked tables by name, its agreement rows by name."
    sys.path.insert(0, str(ROOT / "experiments"))
    from tbps_clip.study.report import agreement_rows, build_report, study_groups, data_label
    from tbps_clip.study.runs import load_records
    from tbps_experiments import REPORT_SECTIONS
    tables = {t: m for (_, t), m in build_report([study], tmp_path, figures=False, sections=REPORT_SECTIONS).items()}
    recs = load_records(study)
    groups, _ = study_groups(recs, study, tmp_path, data_label(recs), figures=False, sections=REPORT_SECTIONS)
    return tables, {r["table"]: r for r in agreement_rows(groups, tables)}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    "Each study's report from its records, built once for this module's tests: reports(folder) -> (tables, agreement)."
    built = {}
    def get(study: Path) -> tuple:
        if study not in built: built[study] = study_report(study, tmp_path_factory.mktemp(study.name))
        return built[study]
    return get


def test_study_page_numbers_are_the_records(reports):
    "Every paired effect, 2-SE figure, count and rate of docs/study.md's v3 section is what the committed records give."
    sys.path.insert(0, str(ROOT / "experiments"))
    from tbps_experiments import study_sd
    text = (ROOT / "docs" / "study.md").read_text(encoding="utf-8").split("## The second analogue (v3)", 1)[1].split("## The regime map", 1)[0]
    tables, agreement = reports(STUDY)
    sd, dof = study_sd(STUDY)
    assert f"s = {sd:.2f} R@1,\n{dof} degrees of freedom" in text or f"s = {sd:.2f} R@1, {dof} degrees of freedom" in text.replace("\n", " ")
    rows = re.findall(r"^\| ([^|]+?) \| [^|]* \| ([+-]?\d+\.\d\d) \((\d+\.\d\d)\) \|", text, re.M)
    assert {label for label, _, _ in rows} == set(README_ROWS), rows
    for label, effect, two_se in rows:
        table, name = README_ROWS[label]
        r = next(r for r in tables[table] if r["label"] == name)
        assert (float(effect), float(two_se)) == (round(r["ours_effect"], 2), round(r["resolvable"], 2)), (label, r)
    per_table = re.findall(r"^\| (\d+(?: \((?:\d+%|appendix)\))?|batch size)[^|]*\| (\d+) of (\d+)", text, re.M)
    assert {t for t, _, _ in per_table} == set(README_TABLES), per_table
    for t, resolved, n in per_table:
        a = agreement[README_TABLES[t]]
        assert (int(resolved), int(n)) == (a["resolved"], a["rows"]), (t, a)
    totals = re.findall(r"^\| ([^|]+?) \| (\d+) \| (\d+) \| (\d+) \| (\d+)% \((\d+)%-(\d+)%\) \|$", text, re.M)
    names = {"Tables 1-5 (ablations)": "Tables 1-5 (ablations)", "Tables 6-8 (presets)": "Tables 6-8 (presets)",
             "all ablations (Tables 1-8 and the batch size)": "all ablations (main tables, presets, batch size)",
             "appendix sweeps (Tables 2 and 3)": "all ablations (appendix sweeps)", "probes (Tables 10-12)": "all probes (Tables 10-12)"}
    assert {t[0] for t in totals} == set(names), totals
    for name, n, resolved, agree, pct, lo, hi in totals:
        a = agreement[names[name]]
        assert (int(n), int(resolved), int(agree)) == (a["rows"], a["resolved"], a["agree"]), (name, a)
        assert (int(pct), int(lo), int(hi)) == (round(100 * a["agreement"]), round(100 * a["low"]), round(100 * a["high"])), (name, a)


def agreement_cell(a: dict) -> str:
    "An agreement row as the README's findings table gives it: resolved / agreeing, and the rate with its 95% Wilson interval."
    if not a["resolved"]: return "0 / 0"
    return f"{a['resolved']} / {a['agree']}: {100 * a['agreement']:.0f}% ({100 * a['low']:.0f}-{100 * a['high']:.0f}%)"


# the README's findings rows (paper tables) -> the report's agreement rows they are
FINDINGS = {"1-5": "Tables 1-5 (ablations)", "6-8": "Tables 6-8 (presets)", "1-8, batch size": "all ablations (main tables, presets, batch size)",
            "10-12": "all probes (Tables 10-12)", "2-3, appendix": "all ablations (appendix sweeps)"}
STUDY_V4 = ROOT / "results" / "study" / "synthpedes-v4"
PROBES = "all probes (Tables 10-12)"  # v4 does not rerun them: its parameter file says they stand as v3 measured them


def findings_table() -> tuple:
    "The README's findings table: its column names, and its rows (cells) by their first cell."
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("## Findings (synthetic)", 1)[1].split("\n## ", 1)[0]
    header = re.search(r"^\| tables \(paper\) \|.*$", text, re.M)[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip().strip("|").split("|")]
                                          for line in text[text.index(header):].splitlines()[2:] if line.startswith("|"))}
    return cols, rows


def test_readme_findings_table_is_the_records(reports):
    "Each row of the README's findings table: its comparisons, how many resolve and agree in v3 and in v4, and the rates with their intervals, from the records."
    cols, rows = findings_table()
    assert set(rows) == set(FINDINGS), rows
    v3, v4 = cols.index("v3: resolve / agree: rate (95% interval)"), cols.index("v4 at N* = 200: resolve / agree: rate (95% interval)")
    (_, agreement), (_, agreement4) = reports(STUDY), reports(STUDY_V4)
    for group, name in FINDINGS.items():
        a, said = agreement[name], rows[group]
        n = re.fullmatch(r"(\d+)(?: \(v4: (\d+)\))?", said[cols.index("comparisons")])
        assert int(n[1]) == a["rows"] and int(n[2] or n[1]) == agreement4.get(name, a)["rows"], (group, said)
        assert said[v3] == agreement_cell(a), (group, said, a)
        if name == PROBES:
            assert said[v4] == "not rerun" and name not in agreement4, (said, agreement4.get(name))
        else:
            assert said[v4] == agreement_cell(agreement4[name]), (group, said, agreement4[name])


def test_readme_v4_reading_is_the_records_and_the_report(reports):
    """The README's reading of v4 (fit_explanation, fixed in v4's parameter file) is the committed v3-v4 report's, final,
    and what the rule gives on the agreement rows rebuilt from both studies' records."""
    import json
    sys.path.insert(0, str(ROOT / "experiments"))
    from tbps_experiments import MAIN_ABLATIONS, fit_explanation_reading
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    said = re.search(r'v4 reads the fit explanation as "(\w+)": (\d+) of (\d+) resolved main ablation comparisons agree with the '
                     r'paper, against (\d+) of (\d+) in v3', text)
    assert said, "the README states v4's reading"
    (reading, agree4, res4, agree3, res3) = said[1], *map(int, said.groups()[1:])
    rows = [list(reports(s)[1].values()) for s in (STUDY, STUDY_V4)]
    rule = fit_explanation_reading(*rows)
    assert (rule["reading"], rule["after"], rule["before"]) == (reading, f"{agree4} of {res4} resolved agree", f"{agree3} of {res3} resolved agree")
    a3, a4 = (next(r for r in rs if r["table"] == MAIN_ABLATIONS) for rs in rows)
    assert "the intervals overlap ({:.0f}-{:.0f}% and {:.0f}-{:.0f}%)".format(*(100 * x for x in (a4["low"], a4["high"], a3["low"], a3["high"]))) in text
    assert a4["low"] < a3["high"]  # they do overlap
    tables4 = reports(STUDY_V4)[0]
    disagree = [t for t in tables4 if t in ("table1", "table2", "table3", "table4", "table5") or t.startswith("table6_8")
                for r in tables4[t] if r["mark"] == "disagrees" and r.get("counted", True)]
    assert len(disagree) == res4 - agree4 and "Three of the four that still disagree are image augmentations" in text
    assert (len(disagree), disagree.count("table2")) == (4, 3), disagree  # Table 2: image augmentation
    report = json.loads((ROOT / "results" / "study" / "synthpedes-v3-v4" / "report" / "readings.json").read_text())
    assert [(r["rule"], r["group"], r["reading"], r["final"]) for r in report] == [("fit_explanation", MAIN_ABLATIONS, reading, "yes")]


# docs/study.md's v4 section: its rows of v3 against v4 -> the report's agreement rows
V4_COUNTS = {"1, training tricks": "table1", "2, image augmentation": "table2", "3, text augmentation": "table3",
             "4, both augmentations": "table4", "5, losses": "table5", "6-8, presets": "table6_8-tbps-tiny-cs",
             "batch size": "table12_batch", "2 (appendix)": "table2_appendix", "3 (appendix)": "table3_appendix",
             "Tables 1-5 (ablations)": "Tables 1-5 (ablations)", "Tables 6-8 (presets)": "Tables 6-8 (presets)",
             "all ablations (Tables 1-8 and the batch size)": "all ablations (main tables, presets, batch size)",
             "appendix sweeps (Tables 2 and 3)": "all ablations (appendix sweeps)", "probes (Tables 10-12)": PROBES}


def test_study_page_v4_section_is_the_records(reports):
    """docs/study.md's v4 section: what ran and what it cost, its SE rule, v3 against v4 per table (resolve / agree with
    intervals), and Table 1 and the presets' paired effects in both studies, all from the committed records."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from tbps_clip.core import machine_counts
    from tbps_clip.study.report import study_cost
    from tbps_clip.study.runs import load_records
    from tbps_experiments import same_runs_elsewhere, study_sd
    text = (ROOT / "docs" / "study.md").read_text(encoding="utf-8").split("## Study v4", 1)[1].split("\n## ", 1)[0]
    flat = " ".join(text.split())
    recs = load_records(STUDY_V4)
    cost = study_cost(recs)[-1]
    assert (f"{cost['runs']} run records, of which {cost['trained']} trained ({cost['steps']:,} steps) and {cost['reused']} "
            f"reused an identical run of v4; {cost['train_hours']} process-hours of training and {cost['test_hours']} of testing") in flat, cost
    (machine, n), = machine_counts(recs).items()  # one machine computed every trained run
    assert n == cost["trained"] and f"all on one machine ({machine})" in flat, machine
    commit = re.search(r"ran from commit ([0-9a-f]{7,40})", flat)[1]
    assert {r["git_commit"][:len(commit)] for r in recs if not r.get("reused_from")} == {commit}
    same = same_runs_elsewhere([r for r in recs if r["exp"] == "e06"], ROOT / "results" / "study" / "synthpedes-regime-map")
    assert len(same) == 9 and all(s["equal"] and s["commit_there"] != s["commit_here"] for s in same), same
    assert "all nine are bit-identical to them" in flat and f"another commit ({same[0]['commit_there'][:7]})" in flat

    def fit_and_test(exp: str, name: str) -> tuple:
        "A row's mean fit and mean test R@1 over its three seeds."
        rs = [r for r in recs if r["exp"] == exp and r["name"] == name]
        assert len(rs) == 3, (exp, name, len(rs))
        return sum(r["fit"]["R@1"] for r in rs) / 3, sum(r["metrics"]["R@1"] for r in rs) / 3
    (clip_fit, clip_test), (tbps_fit, tbps_test) = fit_and_test("e06", "clip@tbps-tiny-cs"), fit_and_test("e06", "tbps@tbps-tiny-cs")
    star_fit, star_test = fit_and_test("e01", "clip_star")
    assert f"(fit {clip_fit:.1f}, test R@1 {clip_test:.2f})" in flat and f"(fit {tbps_fit:.1f}, test {tbps_test:.2f})" in flat
    assert f"fits them less ({star_fit:.1f}) and retrieves new ones better ({star_test:.2f})" in flat
    sd, dof = study_sd(STUDY_V4, recs=recs)
    assert f"s = {sd:.2f} R@1, {dof} degrees of freedom" in flat, (sd, dof)
    (tables3, a3), (tables4, a4) = reports(STUDY), reports(STUDY_V4)
    counts = re.findall(r"^\| ([^|]+?) \| (\d+)(?: \(v4: (\d+)\))? \| ([^|]+?) \| ([^|]+?) \|$", text, re.M)
    assert {c[0] for c in counts} == set(V4_COUNTS), counts
    for label, n, n4, v3, v4 in counts:
        key = V4_COUNTS[label]
        assert (int(n), v3) == (a3[key]["rows"], agreement_cell(a3[key])), (label, a3[key])
        assert v4 == ("not rerun" if key not in a4 else agreement_cell(a4[key])), (label, a4.get(key))
        assert int(n4 or n) == a4.get(key, a3[key])["rows"], (label, n4, a4.get(key))
    assert set(a3) - set(a4) == {"table12_batch", PROBES} | {k for k in a3 if k.startswith(("table10", "table11", "table12"))}
    effects = re.findall(r"^\| ([^|]+?) \| ([+-]?\d+\.\d\d) \((\d+\.\d\d)\) \| ([+-]?\d+\.\d\d) \((\d+\.\d\d)\) \| [^|]+ \| ([^|]+?) \|$", text, re.M)
    assert {e[0] for e in effects} == set(README_ROWS), effects
    for label, e3, se3, e4, se4, mark in effects:
        table, name = README_ROWS[label]
        r3, r4 = (next(r for r in t[table] if r["label"] == name) for t in (tables3, tables4))
        assert (float(e3), float(se3)) == (round(r3["ours_effect"], 2), round(r3["resolvable"], 2)), (label, r3)
        assert (float(e4), float(se4), mark) == (round(r4["ours_effect"], 2), round(r4["resolvable"], 2), r4["mark"]), (label, r4)


def test_readme_is_short_and_its_commands_table_names_every_command():
    "The README is a front door (at most about 150 lines); its table of commands has a row for each `tbps-clip` command."
    from tbps_clip.cli import build_parser
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150, len(text.splitlines())
    table = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `tbps-clip (\w+)", table, re.M))
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    assert named == set(sub.choices), sorted(named ^ set(sub.choices))


def test_readme_regime_map_figures_are_the_records():
    "The README's fit of clip at N = 100 and 200 (seeds 0-2) is the regime map's records', and N* follows from the fit rule."
    import json, statistics
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    said = re.search(r"is ([0-9.]+) at N = 100 and ([0-9.]+) at N = 200 \(seeds 0-2\)", text.replace("\n", " "))
    recs = ROOT / "results" / "study" / "synthpedes-regime-map" / "records" / "e13"
    fit = {n: [json.loads((recs / f"clip@{n}-s{s}.json").read_text())["fit"]["R@1"] for s in range(3)] for n in (100, 200)}
    assert said and (float(said[1]), float(said[2])) == (round(statistics.mean(fit[100]), 1), round(statistics.mean(fit[200]), 1))
    at350 = [json.loads(f.read_text())["fit"]["R@1"] for f in sorted(recs.glob("clip@350-s*.json"))]
    assert statistics.mean(fit[200]) >= 90 and (sum(at350) + 100 * (3 - len(at350))) / 3 < 90  # N* = 200 whatever seeds remain
    assert "N* = 200" in text and "data.fewshot: 0.2" in (ROOT / "experiments" / "params" / "synthpedes-v4-study.yaml").read_text()


def test_readme_regime_map_effects_and_sign_changes_are_the_records():
    "The README's fit at N = 1,000, TBPS-CLIP's effects, the sign-change Ns and the readings are what e13's functions give from the records."
    sys.path.insert(0, str(ROOT / "experiments"))
    from tbps_clip.study.runs import load_records
    from tbps_experiments import MAP_PRESETS, fit_rule, regime_effects, regime_readings, sign_change
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    recs = [r for r in load_records(ROOT / "results" / "study" / "synthpedes-regime-map") if r["exp"] == "e13"]
    assert len(recs) == 72, len(recs)
    rows = regime_effects(recs)
    fit = fit_rule(recs)["clip_fit"]
    assert f"(seeds 0-2) and {fit[1000]:.1f} at N = 1,000" in text, fit
    tbps = {r["N"]: r for r in rows if r["preset"] == "tbps"}
    said = re.search(r"TBPS-CLIP ([+-]\d+\.\d\d) R@1 \(2 SE (\d+\.\d\d)\) at N = 100 and ([+-]\d+\.\d\d) \((\d+\.\d\d)\) at N = 1,000", text)
    assert said, "the README states TBPS-CLIP's effect at N = 100 and 1,000"
    assert [float(x) for x in said.groups()] == [round(tbps[100]["effect"], 2), round(2 * tbps[100]["se"], 2),
                                                  round(tbps[1000]["effect"], 2), round(2 * tbps[1000]["se"], 2)], said.groups()
    cross = re.search(r"change sign at N = (\d+) \(CLIP\*\), (\d+) \(Simplified\) and (\d+) \(TBPS-CLIP\)", text)
    assert cross and [int(x) for x in cross.groups()] == [round(sign_change(rows, p)["sign_change_N"]) for p in MAP_PRESETS]
    readings = {p: r["reading"] for p, r in regime_readings(rows, MAP_PRESETS).items()}
    assert 'all three readings are "supported"' in text and set(readings.values()) == {"supported"}, readings


def test_study_page_regime_map_table_is_the_records():
    "Each row of docs/study.md's regime-map table (clip's fit, the three effects, TBPS-CLIP's 2 SE) is what e13's functions give."
    sys.path.insert(0, str(ROOT / "experiments"))
    from tbps_clip.study.runs import load_records
    from tbps_experiments import MAP_PRESETS, fit_rule, regime_effects
    text = (ROOT / "docs" / "study.md").read_text(encoding="utf-8").split("## The regime map\n", 1)[1].split("\n## ", 1)[0]
    recs = [r for r in load_records(ROOT / "results" / "study" / "synthpedes-regime-map") if r["exp"] == "e13"]
    rows = {(r["N"], r["preset"]): r for r in regime_effects(recs)}
    fit = fit_rule(recs)["clip_fit"]
    said = re.findall(r"^\| ([\d,]+) \| (\d+\.\d) \| ([+-]\d+\.\d\d) \| ([+-]\d+\.\d\d) \| ([+-]\d+\.\d\d) \| (\d+\.\d\d) \|$", text, re.M)
    assert [int(s[0].replace(",", "")) for s in said] == sorted(fit), said
    for n, f, *effects, two_se in said:
        n = int(n.replace(",", ""))
        want = [round(fit[n], 1)] + [round(rows[n, p]["effect"], 2) + 0.0 for p in MAP_PRESETS] + [round(2 * rows[n, "tbps"]["se"], 2)]
        assert [float(f)] + [float(e) for e in effects] + [float(two_se)] == want, (n, want)
    from tbps_clip.study.report import study_cost
    cost = study_cost(recs)[-1]
    assert f"runs took {cost['train_hours']} process-hours of training and {cost['test_hours']} of testing" in " ".join(text.split()), cost
