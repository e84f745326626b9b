"""The study: every experiment notebook at smoke scale through papermill, and the driver under interruption and failure."""
import csv
import json
import os
import re
import statistics
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tbps_clip.core import TBPSError
from tbps_clip.study.driver import load_sweep, run_notebook, run_sweep, sweep_executor, sweep_status
from tbps_clip.study.grid import e06_rows, scale_overrides, select_rows
from tbps_clip.study.marks import IDENTICAL, LOWER, NO_CHANGE, agreement_summary, compare, pooled_paired_sd, summarise
from tbps_clip.study.paper import PAPER
from tbps_clip.study.report import build_report, collect, mark_groups, table_group
from tbps_clip.study.runs import load_records, read_record, record_path, run_dir_of, run_once

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))  # the code that belongs to one experiment, as its notebooks import it
import tbps_experiments  # noqa: E402
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("e*.ipynb"))
FIGURES = {"e01_tricks": ["e01"], "e02_image_aug": ["e02", "e02_appendix"], "e03_text_aug": ["e03", "e03_appendix"],
           "e04_both_aug": ["e04"], "e05_losses": ["e05"], "e06_main": ["e06"], "e07_cost": ["e07"], "e08_irra_init": ["e08"],
           "e09_fewshot": ["e09"], "e10_importance": ["e10"], "e11_compression": ["e11"], "e12_batch_size": ["e12"], "e13_regime_map": ["e13"]}
papermill = pytest.importorskip("papermill", reason="papermill is a dev dependency (pip install -e '.[dev]')")


@pytest.fixture
def kernel_env(monkeypatch):
    "Kernels started by papermill import this checkout and use one thread."
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"): monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---- the experiment notebooks -----------------------------------------------------------------------

def _cells(name):
    return json.loads((ROOT / "experiments" / f"{name}.ipynb").read_text())["cells"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_notebooks_are_clean_and_train_only_through_the_library(name):
    cells = _cells(name)
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# e")
    assert sum("parameters" in c["metadata"].get("tags", []) for c in cells) == 1
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")
    for banned in ("Trainer(", "import torch", ".backward(", "from tbps_clip.run import", "optimizer"):
        assert banned not in code, f"{name}: training code in the notebook ({banned})"


def test_smoke_sweep_lists_every_experiment_notebook():
    spec = load_sweep(ROOT / "experiments" / "params" / "synthpedes-smoke.yaml")
    assert sorted(Path(n).stem for n, _ in spec["runs"]) == EXPERIMENTS
    for f in (ROOT / "experiments" / "params").glob("*.yaml"):  # every parameter file reads and names existing notebooks
        s = load_sweep(f)
        assert all((s["notebooks_dir"] / f"{n}.ipynb").is_file() for n, _ in s["runs"]), f


@pytest.mark.slow
def test_every_experiment_notebook_runs_at_smoke_scale(tmp_path, kernel_env):
    "CI: all notebooks through papermill on the CPU; each leaves its records, tables and figure; a rerun redoes nothing."
    t0 = time.perf_counter()
    res = run_sweep(ROOT / "experiments" / "params" / "synthpedes-smoke.yaml", out=tmp_path, log=None)
    took = time.perf_counter() - t0
    failed = [r for r in res if r["status"] != "ok"]
    assert not failed, "\n\n".join(f"{r['notebook']}: {r['traceback'][-3000:]}" for r in failed)
    print(f"\nsmoke sweep of {len(res)} notebooks: {took:.0f} s; " + ", ".join(f"{Path(r['notebook']).stem} {r['seconds']:.0f} s" for r in res))
    recs = load_records(tmp_path)
    for nb, figs in FIGURES.items():
        exp = nb.split("_")[0]
        mine = [r for r in recs if r["exp"] == exp]
        assert mine, f"{nb} wrote no records"
        assert all(r["synthetic"] and r["scale"] == "smoke" and r["steps"] == r["config"]["train"]["max_steps"] for r in mine)
        assert all({"environment", "git_commit", "wall_seconds", "config", "metrics"} <= set(r) for r in mine)
        for f in figs: assert (tmp_path / "figures" / f"{f}.png").stat().st_size > 5000, f
    assert {r["name"] for r in recs if r["exp"] == "e01"} == set(PAPER["table1"]["rows"])
    assert all(r.get("params_m") for r in recs if r["exp"] == "e07")
    by = {(r["exp"], r["name"]): r for r in recs}  # rows with the same settings and seed as an earlier run reuse it
    assert by[("e02", "clip_star")]["reused_from"] == by[("e03", "clip_star")]["reused_from"] == "e01/clip_star"
    assert by[("e05", "itc")]["reused_from"] == "e04/both"
    assert by[("e06", "tbps@tbps-micro")]["metrics"] == by[("e05", "all")]["metrics"]
    # the probes: IRRA from checkpoints this sweep trained; few-shot subsets; scores of every module; layers from them
    assert {r["name"] for r in recs if r["exp"] == "e08"} == {"clip", "tbps", "simplified", "source@tbps", "source@simplified"}
    for init in ("tbps", "simplified"):
        assert by[("e08", init)]["config"]["model"]["pretrained"] == str(tmp_path / "runs" / "e08" / f"source@{init}-s0" / "checkpoint.pt")
        assert (tmp_path / "runs" / "e08" / f"source@{init}-s0" / "checkpoint.pt").is_file() and not by[("e08", f"source@{init}")].get("reused_from")
    assert by[("e08", "clip")]["config"]["model"]["pretrained"] == "none" and by[("e08", "clip")]["config"]["loss"]["sdm"] == 1.0
    assert {r["name"] for r in recs if r["exp"] == "e09"} == set(PAPER["table11"]["rows"])
    assert by[("e09", "clip@0.01")]["train_ids"] == 1 and by[("e09", "clip@0.1")]["train_ids"] == 1 and by[("e09", "tbps@0.05")]["train_ids"] == 1
    assert by[("e09", "coop@0.05")]["config"]["model"]["probe"] == "coop" and by[("e09", "adapter@0.05")]["config"]["model"]["probe"] == "adapter"
    imp = json.loads((tmp_path / "importance" / "e10-tbps-s0.json").read_text())
    assert len(imp["rows"]) == 2 * 2 * 3 and {r["part"] for r in imp["rows"]} == {"sa", "ff", "layer"} and imp["settings"]["split"] == "test"
    assert all(0 <= r["c2"] <= 1 and r["c1"] <= 1 for r in imp["rows"])
    from tbps_clip.importance import layer_importance, least_important_layers
    worst = least_important_layers(layer_importance(imp["rows"], "text"), 1)
    assert {r["name"] for r in recs if r["exp"] == "e11"} == {"full", "drop@1", "freeze@1"}  # micro: 2 text layers, x = 1 only
    assert by[("e11", "drop@1")]["config"]["model"]["drop_text_layers"] == worst == by[("e11", "freeze@1")]["config"]["train"]["freeze_text_layers"]
    assert by[("e11", "full")]["reused_from"] in ("e05/all", "e10/tbps")  # the tbps preset's run: not trained again
    t12 = (tmp_path / "tables" / "table12_vit_b16.csv").read_text().splitlines()
    assert len(t12) == 13 and all(line.endswith(",True") for line in t12[1:])  # ViT-B/16 counts = the paper's Table 12
    report = (tmp_path / "report" / "report.md").read_text()
    assert all(t in report for t in ("Table 10", "Table 11", "Table 12", "e10: module importance"))
    assert "SynthPEDES (synthetic)" in report and "Table 5" in report and (tmp_path / "report" / "figures" / "agreement.png").exists()
    n_files = len(list((tmp_path / "records").rglob("*.json")))
    again = run_sweep(ROOT / "experiments" / "params" / "synthpedes-smoke.yaml", out=tmp_path, log=None)
    assert all(r.get("skipped") for r in again) and len(list((tmp_path / "records").rglob("*.json"))) == n_files


# ---- the driver: resume and failure -------------------------------------------------------------------

FAKE = '''
import json, os, time
from pathlib import Path
o = Path(out)
(o / "ran").mkdir(parents=True, exist_ok=True)
(o / "ran" / f"{name}-{time.time_ns()}").touch()  # one file per execution
if block:
    (o / f"started-{name}").touch()
    for _ in range(600):
        if (o / "go").exists(): break
        time.sleep(0.1)
if fail: raise ValueError(f"boom from {name}")
p = o / "records" / "fake" / f"{name}-s0.json"  # as run_once: written once, atomically, skipped when there
if not p.exists():
    p.parent.mkdir(parents=True, exist_ok=True)
    p.with_suffix(".tmp").write_text(json.dumps(dict(exp="fake", name=name, seed=0, metrics={"R@1": 1.0})))
    os.replace(p.with_suffix(".tmp"), p)
'''


def fake_sweep(tmp_path, specs):
    "A sweep over tiny notebooks that count their executions and write one record each (no training, no torch: fast kernels)."
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook
    nbdir = tmp_path / "nbs"; nbdir.mkdir()
    for name in dict.fromkeys(n for n, _ in specs):
        params = new_code_cell(f"name = {name!r}\nblock = False\nfail = False\nout = ''", metadata={"tags": ["parameters"]})
        nb = new_notebook(cells=[params, new_code_cell(FAKE)],
                          metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
        nbformat.write(nb, nbdir / f"{name}.ipynb")
    import yaml
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(dict(out=str(tmp_path / "out"), notebooks_dir=str(nbdir), params={},
                                         notebooks=[{"notebook": n, "params": p} for n, p in specs])))
    return sweep, tmp_path / "out"


def executions(out, name):
    return len(list((out / "ran").glob(f"{name}-*")))


def test_killed_sweep_resumes_without_redoing_or_duplicating(tmp_path, kernel_env):
    sweep, out = fake_sweep(tmp_path, [("a", {}), ("b", {"block": True}), ("c", {})])
    cmd = [sys.executable, "-m", "tbps_clip.cli", "study", "run", str(sweep), "--allow-dirty"]  # a checkout under development may differ from HEAD
    p = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):  # wait until b runs, then kill the driver and its kernel mid-notebook
            if (out / "started-b").exists() or p.poll() is not None: break
            time.sleep(0.1)
        assert (out / "started-b").exists(), "the sweep never reached notebook b"
    finally:
        os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert executions(out, "a") == 1 and executions(out, "c") == 0
    # b was marked running; its driver is gone, so it reads stopped
    assert {s["notebook"].split("/")[-1]: s["status"] for s in sweep_status(out)} == {"a.ipynb": "ok", "b.ipynb": "stopped"}
    st = subprocess.run([sys.executable, "-m", "tbps_clip.cli", "study", "status", str(sweep)], cwd=ROOT, capture_output=True, text=True)
    assert st.returncode == 0 and [l.split()[:2] for l in st.stdout.splitlines()[:3]] == [["a", "ok"], ["b", "stopped"], ["c", "pending"]], st.stdout
    (out / "go").touch()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "a: done earlier" in r.stdout and "3 of 3 notebook(s) ok (1 done earlier)" in r.stdout
    assert (executions(out, "a"), executions(out, "b"), executions(out, "c")) == (1, 2, 1)
    assert sorted(s["status"] for s in sweep_status(out)) == ["ok"] * 3
    assert sorted(r["name"] for r in load_records(out)) == ["a", "b", "c"]


def test_status_names_runs_without_a_record_and_where_each_resumes(tmp_path, capsys):
    from tbps_clip.cli import main
    from tbps_clip.core import atomic_write_json
    out = tmp_path / "out"
    xeon = dict(cpu_model="Xeon", cpu_capability="AVX512", torch="2.4")
    atomic_write_json(out / "records" / "e01" / "clip-s0.json", dict(exp="e01", name="clip", seed=0, metrics={}, environment=xeon,
                                                                      created=time.strftime("%Y-%m-%dT%H:%M:%S")))
    atomic_write_json(out / "records" / "e01" / "clip-s1.json", dict(exp="e01", name="clip", seed=1, metrics={},  # long ago, elsewhere
                                                                      environment=dict(xeon, cpu_capability="AVX2"), created="2026-01-02T09:00:00"))
    (out / "runs" / "e01" / "clip-s0").mkdir(parents=True)  # finished: it has its record
    stopped = out / "runs" / "e01" / "tbps-s1"
    stopped.mkdir(parents=True)
    (stopped / "config.yaml").write_text("train:\n  max_steps: 300\n")
    atomic_write_json(stopped / "history.json", {"train": [{"step": 100}, {"step": 200}], "eval": []})
    (stopped / "checkpoint.pt").write_bytes(b"")
    fresh = out / "runs" / "e05" / "nitc-s2"
    fresh.mkdir(parents=True)  # started, nothing saved yet
    main(["study", "status", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert "2 run records" in lines[0] and lines[3].startswith("2 run(s) without a record yet"), lines
    assert lines[1] == ("trained on: Xeon (AVX2), torch 2.4 (1); Xeon (AVX512), torch 2.4 (1); several machines: a paired effect "
                        "across two of them includes their difference"), lines
    assert re.fullmatch(r"in the last hour: 1 run records \(1 trained, 0 reused\); the newest written \d+ s ago", lines[2]), lines
    assert lines[4].split()[:10] == ["e01/tbps-s1", "saved", "after", "step", "200", "of", "300", "checkpoint", "last", "written"], lines
    assert lines[5].split()[:6] == ["e05/nitc-s2", "nothing", "saved", "yet", "no", "checkpoint"], lines


def test_failing_notebook_is_recorded_and_the_sweep_goes_on(tmp_path, kernel_env, capsys):
    from tbps_clip.cli import main
    sweep, out = fake_sweep(tmp_path, [("a", {}), ("bad", {"fail": True}), ("c", {})])
    res = run_sweep(sweep, log=None)
    assert [r["status"] for r in res] == ["ok", "failed", "ok"]
    bad = res[1]
    assert bad["error"] == "ValueError: boom from bad" and "boom from bad" in bad["traceback"] and "\x1b[" not in bad["traceback"]
    assert json.loads(Path(out / "sweep" / f"bad-{bad['key']}.json").read_text())["traceback"] == bad["traceback"]
    assert "failed bad.ipynb" in (out / "sweep" / "sweep.log").read_text()
    assert main(["study", "run", str(sweep), "--allow-dirty"]) == 2  # again: a and c skipped, bad retried and still failing
    err = capsys.readouterr().err
    assert "1 notebook(s) failed: bad: ValueError: boom from bad" in err
    assert (executions(out, "a"), executions(out, "bad"), executions(out, "c")) == (1, 2, 1)
    assert len(sweep_status(out)) == 3 and sorted(r["name"] for r in load_records(out)) == ["a", "c"]


def test_study_run_notes_trained_runs_computed_on_other_machines(tmp_path, kernel_env, capsys):
    "Resuming a folder whose trained runs were computed elsewhere says so before it runs (their numbers can differ from this machine's)."
    from tbps_clip.cli import main
    from tbps_clip.core import atomic_write_json, environment_info
    sweep, out = fake_sweep(tmp_path, [("a", {})])
    rec = lambda seed, env, **kw: atomic_write_json(out / "records" / "e01" / f"clip-s{seed}.json",
                                                   dict(exp="e01", name="clip", seed=seed, metrics={}, environment=env, **kw))
    rec(0, environment_info())  # this machine
    rec(1, dict(cpu_model="Elsewhere", cpu_capability="AVX2", torch="2.4"), reused_from="e02/clip")  # reused: computed by its source
    assert main(["study", "run", str(sweep), "--allow-dirty"]) == 0
    assert "other machines" not in capsys.readouterr().err
    rec(2, dict(cpu_model="Elsewhere", cpu_capability="AVX2", torch="2.4"))
    assert main(["study", "run", str(sweep), "--allow-dirty"]) == 0
    err = capsys.readouterr().err
    # the fake notebook's own record names no machine: it cannot be known to be this one's
    assert (f"note: 2 trained run(s) in {out} were computed on other machines (CPU model not recorded (kernels not recorded), "
            "torch ?; Elsewhere (AVX2), torch 2.4)") in err, err


def test_sweep_file_errors_name_the_file_and_entry(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("out: x\nnotebooks: [{params: {}}]\n")
    with pytest.raises(TBPSError, match=r"s.yaml: notebooks entry 1"):
        run_sweep(bad)
    bad.write_text("out: x\nnotebooks: [nope]\n")
    with pytest.raises(TBPSError, match=r"notebook\(s\) not found: .*nope.ipynb"):
        run_sweep(bad)
    bad.write_text("out: x\nnotebook: [a]\n")
    with pytest.raises(TBPSError, match="needs a 'notebooks' list"):
        run_sweep(bad)


# ---- runs and records -----------------------------------------------------------------------------------

def test_interrupted_run_resumes_from_its_checkpoint_and_records_once(tmp_path, monkeypatch):
    "A run killed mid-training (checkpoint, no record) resumes; its record equals an uninterrupted run's."
    from tbps_clip.config import make_config
    from tbps_clip.run import train
    from test_train import Crash
    ov = {**scale_overrides("smoke"), "train.max_steps": 6, "train.ckpt_every": 2, "trick.text_dropout": 0.1}
    full = run_once("e01", "clip", "clip", ov, 0, "smoke", tmp_path / "full")
    # what run_once would have been doing when it was killed after step 3 (checkpoint at step 2)
    path = record_path(tmp_path / "cut", "e01", "clip", 0)
    run_dir = tmp_path / "cut" / "runs" / "e01" / path.stem
    with pytest.raises(KeyboardInterrupt):
        train(make_config("clip", {**ov, "train.seed": 0, "out_dir": str(run_dir)}), progress=False, callbacks=[Crash(3)])
    assert (run_dir / "checkpoint.pt").exists() and not path.exists()
    from tbps_clip.train import Trainer
    loads, real_load = [], Trainer.load
    monkeypatch.setattr(Trainer, "load", lambda self: (loads.append(self.ckpt_path), real_load(self))[1])
    resumed = run_once("e01", "clip", "clip", ov, 0, "smoke", tmp_path / "cut")
    assert loads == [run_dir / "checkpoint.pt"]  # continued from the checkpoint, not started again
    timing = ("encode_s", "rank_s")
    assert {k: v for k, v in resumed["metrics"].items() if k not in timing} == {k: v for k, v in full["metrics"].items() if k not in timing}
    assert resumed["steps"] == 6 and not (run_dir / "checkpoint.pt").exists()
    assert len(list((tmp_path / "cut" / "records").rglob("*.json"))) == 1
    assert run_once("e01", "clip", "clip", ov, 0, "smoke", tmp_path / "cut") == resumed  # recorded: not run again
    with pytest.raises(TBPSError, match="exists with other settings.*train.max_steps"):
        run_once("e01", "clip", "clip", {**ov, "train.max_steps": 7}, 0, "smoke", tmp_path / "cut")
    path.write_text("{not json")
    with pytest.raises(TBPSError, match="cannot read the record"):
        read_record(path)


# ---- agreement marks on hand-made records ---------------------------------------------------------------------

def rec(exp, name, seed, r1, dataset="synthpedes"):
    return dict(exp=exp, name=name, seed=seed, scale="study", dataset=dataset, synthetic=dataset == "synthpedes",
                metrics={"R@1": r1, "R@5": r1 + 10, "mAP": r1 - 1}, config={"model": {"arch": "tbps-tiny"}})


def _marked(recs, table, sd="pooled"):
    "The table's comparisons marked with the sd pooled over them (or the sd given)."
    g = table_group(recs, table)
    if sd == "pooled": sd = pooled_paired_sd([(recs, c["row"], c["against"]) for c in g["specs"]])[0]
    return {m["name"]: m for m in compare(recs, g["specs"], sd)}


def test_agreement_marks_on_hand_made_records():
    # CLIP 20 +- 1 over seeds; paper: every trick helps. GlobalGrad +5 (agrees), Dropout +0.2 (noise), LockBL -4 (disagrees)
    noise = (0.3, -0.3, 0.0)
    recs = [rec("e01", "clip", s, v) for s, v in enumerate((19.0, 20.0, 21.0))]
    recs += [rec("e01", "global_grad", s, 24.0 + s + noise[s]) for s in range(3)]
    recs += [rec("e01", "dropout", s, 19.2 + s - noise[s]) for s in range(3)]
    recs += [rec("e01", "lock_bl", s, 15.0 + s + noise[s]) for s in range(3)]
    recs += [rec("e01", "soft_label", 1, 23.0), rec("e01", "extra_row", 0, 30.0)]
    marked = _marked(recs, "table1")
    assert list(marked) == ["global_grad", "dropout", "lock_bl", "soft_label", "extra_row"]  # the paper's order, extra rows last
    sd = (sum(x * x for x in (0.3, -0.3, 0.0)) / 2) ** 0.5  # every multi-seed comparison has this sd: the pooled sd
    gg = marked["global_grad"]
    assert gg["mark"] == "agrees" and gg["ours_effect"] == pytest.approx(5.0) and gg["se"] == pytest.approx(sd / 3 ** 0.5)
    assert gg["paper_effect"] == pytest.approx(63.66 - 60.67) and gg["against"] == "clip" and gg["n"] == 3
    assert marked["dropout"]["mark"] == "within seed noise" and marked["lock_bl"]["mark"] == "disagrees"
    assert marked["soft_label"]["n"] == 1 and marked["soft_label"]["se"] == pytest.approx(sd) and marked["soft_label"]["mark"] == "agrees"
    assert marked["extra_row"]["mark"] == "not in the paper"
    s = agreement_summary(marked.values())
    assert (s["rows"], s["resolved"], s["agree"]) == (4, 3, 2) and 0 < s["low"] < 2 / 3 < s["high"] < 1
    # one seed everywhere: no SE, direction only, never counted as agreeing
    one = _marked([rec("e01", "clip", 0, 20.0), rec("e01", "dropout", 0, 21.0)], "table1")
    assert one["dropout"]["mark"] == "direction only" and agreement_summary(one.values())["agree"] == 0
    assert _marked([rec("e01", "clip", 0, 20.0), rec("e01", "dropout", 1, 19.0)], "table1")["dropout"]["mark"] == "no paired seed"


def test_appendix_rows_use_the_main_row_for_the_default_value():
    recs = [rec("e02", "clip_star", 0, 20.0), rec("e02", "rrc", 0, 21.0), rec("e02", "rrc@0.3", 0, 19.0)]
    app = _marked(recs, "table2_appendix", sd=1.0)
    assert app["rrc"]["label"] == "RRC scale 0.9" and app["rrc"]["paper_effect"] == pytest.approx(65.29 - 64.34)
    assert app["rrc@0.3"]["paper_effect"] == pytest.approx(64.82 - 64.34) and app["rrc@0.3"]["mark"] == "within seed noise"


def test_collect_gathers_records_into_one_table(tmp_path):
    from tbps_clip.core import atomic_write_json
    for r in [rec("e04", "clip_star", s, 20.0 + s) for s in (0, 1)] + [rec("e04", "both", s, 24.0 + s) for s in (0, 1)]:
        atomic_write_json(record_path(tmp_path, r["exp"], r["name"], r["seed"]), r)
    res = collect(tmp_path, csv_path=tmp_path / "runs.csv", md_path=tmp_path / "summary.md")
    assert len(res["runs"]) == 4 and (tmp_path / "runs.csv").read_text().count("\n") == 5
    md = (tmp_path / "summary.md").read_text()
    assert "## e04: SynthPEDES (synthetic), scale study" in md and "| both | 2 | 24.50 |" in md and "agrees" not in md  # marks: the report


def test_collect_refuses_a_missing_folder_and_a_smoke_summary_says_smoke(tmp_path, capsys):
    from tbps_clip.cli import main
    from tbps_clip.core import atomic_write_json
    assert main(["study", "collect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope: no such results folder" in err and not (tmp_path / "nope").exists()
    for r in [dict(rec("e01", n, 0, v), scale="smoke") for n, v in (("clip", 1.0), ("dropout", 2.0))]:
        atomic_write_json(record_path(tmp_path / "s", r["exp"], r["name"], r["seed"]), r)
    assert main(["study", "collect", str(tmp_path / "s")]) == 0
    head = (tmp_path / "s" / "summary.md").read_text().splitlines()[0]
    assert head == "## e01: SynthPEDES (synthetic), scale smoke (a smoke run: the numbers mean nothing)"


@pytest.mark.parametrize("name", ["cuhk-pedes-paper", "icfg-pedes-paper", "rstpreid-paper"])
def test_paper_parameter_files_give_the_papers_recipe(name):
    "Every run a paper-scale file asks for resolves to the paper's settings, with real data and OpenAI weights."
    from tbps_clip.config import make_config
    spec = load_sweep(ROOT / "experiments" / "params" / f"{name}.yaml")
    n = 0
    for nb, p in spec["runs"]:
        if nb == "e99_report": continue
        q = {**spec["params"], **p}
        base = {**scale_overrides(q["scale"], q["dataset"], q["root"], q["arch"], q["weights"], q["steps"]), **q["overrides"]}
        exp = nb.split("_")[0]
        rows = (e06_rows(["clip", "tbps", "simplified"], q["backbones"]) if exp == "e06"
                else tbps_experiments.batch_size_rows(q["batch"], 0) if exp == "e12"
                else {i: ("irra", {}) for i in tbps_experiments.IRRA_INITS} if exp == "e08"
                else tbps_experiments.fewshot_rows(q.get("fractions") or (0.01, 0.05, 0.1)) if exp == "e09"
                else tbps_experiments.compression_rows(tbps_experiments.TABLE12_IDS) if exp == "e11" else select_rows(exp, q.get("rows")))
        for row, (preset, ov) in rows.items():
            cfg = make_config(preset, {**base, **ov})
            n += 1
            assert (cfg.train.epochs, cfg.train.max_steps, cfg.optim.lr, cfg.optim.warmup_lr, cfg.optim.min_lr) == (5, 0, 1e-4, 1e-6, 5e-6)
            assert cfg.data.image_size == (224, 224) and cfg.data.normalize == "imagenet" and cfg.model.context_length == 77
            assert cfg.model.quick_gelu and cfg.model.pretrained == f"/weights/{cfg.model.arch}.pt"
            assert cfg.data.dataset == "annotations" and cfg.data.annotations.startswith("/data/")
            # the official code's defaults where the project's own differ (docs/fidelity.md)
            assert cfg.train.precision == "fp16" and cfg.data.train_interpolation == "bilinear"
            assert cfg.aug.pool_replace and (cfg.aug.pool_k, cfg.aug.erase_value) == (2, 0.0)
            assert cfg.data.batch_size * q["nproc"] == (160 if row == "half" else 320)
            assert cfg.train.grad_cache_chunk in (0, 80, 160)
            if exp in ("e01", "e02", "e03", "e04", "e05"): assert cfg.model.arch == "ViT-B-32"  # the paper's ablations
            if exp in ("e07", "e12"): assert cfg.model.arch == "ViT-B-16"
    assert n >= 6


@pytest.mark.slow
def test_run_once_with_several_processes_goes_through_torchrun(tmp_path):
    "nproc > 1 (the paper scale on several GPUs) starts torchrun; here 2 CPU processes with gloo."
    ov = {**scale_overrides("smoke"), "trick.global_grad": True}
    r = run_once("e01", "global_grad", "clip", ov, 0, "smoke", tmp_path, nproc=2)
    assert r["world_size"] == 2 and r["steps"] == 2 and r["config"]["trick"]["global_grad"]
    assert r["epochs"] == pytest.approx(2 * 8 * 2 / 32)  # 2 steps x 8 per process x 2 processes over 32 training pairs (16 images x 2 captions)
    assert run_once("e01", "global_grad", "clip", ov, 0, "smoke", tmp_path, nproc=2) == r


# ---- the probes' helpers: checkpoints they depend on, scores of other settings -------------------------------

def test_probe_runs_refuse_gone_checkpoints_and_scores_of_other_settings(tmp_path):
    from tbps_experiments import importance_path, importance_run, irra_init_runs
    ov = scale_overrides("smoke")
    res = importance_run("clip", 0, "smoke", tmp_path, ov, split="test", grid=[0.0, 0.5, 1.0])
    assert len(res["rows"]) == 12 and res["settings"]["grid"] == [0.0, 0.5, 1.0]
    assert importance_run("clip", 0, "smoke", tmp_path, ov, split="test", grid=[0.0, 0.5, 1.0]) == res  # read back
    with pytest.raises(TBPSError, match="scores of other settings"):
        importance_run("clip", 0, "smoke", tmp_path, ov, split="test", grid=[0.0, 1.0])
    importance_path(tmp_path, "clip", 0).unlink()
    (run_dir_of(tmp_path, "e10", "clip", 0) / "checkpoint.pt").unlink()
    with pytest.raises(TBPSError, match="checkpoint .* is gone"):
        importance_run("clip", 0, "smoke", tmp_path, ov, split="test")
    with pytest.raises(TBPSError, match="split 'val' is empty"):  # the smoke SynthPEDES has no val identities
        importance_run("clip", 1, "smoke", tmp_path, ov)
    r = irra_init_runs(["simplified"], [0], "smoke", tmp_path, ov, log=None)
    ckpt = run_dir_of(tmp_path, "e08", "source@simplified", 0) / "checkpoint.pt"
    assert r[0]["config"]["model"]["pretrained"] == str(ckpt) and r[0]["preset"] == "irra"
    record_path(tmp_path, "e08", "simplified", 0).unlink()
    ckpt.unlink()
    with pytest.raises(TBPSError, match="source@simplified.*checkpoint .* is gone"):
        irra_init_runs(["simplified"], [0], "smoke", tmp_path, ov, log=None)
    with pytest.raises(TBPSError, match="unknown initialisation"):
        irra_init_runs(["nope"], [0], "smoke", tmp_path, ov, log=None)


def test_a_table_of_only_its_baseline_still_runs(tmp_path, kernel_env):
    "Running just the baseline row (e.g. more seeds of it) records the runs and draws an empty effect plot, no crash."
    status = run_notebook(ROOT / "experiments" / "e01_tricks.ipynb", {"scale": "smoke", "rows": ["clip"], "seeds": [0]},
                          tmp_path, cwd=ROOT, log=None)
    assert status["status"] == "ok", status.get("error")
    assert [r["name"] for r in load_records(tmp_path)] == ["clip"]

def test_a_kept_checkpoint_stands_in_for_an_identical_run_and_only_a_kept_one(tmp_path):
    ov = scale_overrides("smoke")
    a = run_once("e10", "clip", "clip", ov, 0, "smoke", tmp_path, keep_checkpoint=True)
    b = run_once("e08", "source@clip", "clip", ov, 0, "smoke", tmp_path, keep_checkpoint=True)  # e08's source of e10's model
    assert b["reused_from"] == "e10/clip" and b["metrics"] == a["metrics"]
    ca, cb = (run_dir_of(tmp_path, e, n, 0) / "checkpoint.pt" for e, n in (("e10", "clip"), ("e08", "source@clip")))
    assert cb.is_file() and cb.read_bytes() == ca.read_bytes()
    other = {**ov, "optim.lr": 1e-5}
    run_once("e06", "x", "clip", other, 0, "smoke", tmp_path)  # the same settings, but its checkpoint was not kept
    c = run_once("e10", "y", "clip", other, 0, "smoke", tmp_path, keep_checkpoint=True)
    assert not c.get("reused_from") and (run_dir_of(tmp_path, "e10", "y", 0) / "checkpoint.pt").is_file()
    assert run_once("e01", "z", "clip", other, 0, "smoke", tmp_path)["reused_from"] == "e06/x"  # records are reused as before


def test_one_comparison_carries_one_mark_in_every_table_and_one_sd_serves_the_study(tmp_path):
    "The image pool appears in Tables 2 and 4 (e04 reuses e02's run): one effect, SE and mark; the sd is pooled once per comparison."
    from tbps_clip.core import atomic_write_json
    noise = (0.4, -0.4, 0.0)
    recs = [rec("e02", "clip_star", s, 30.0 + s) for s in range(3)] + [rec("e02", "pool", s, 29.3 + s + noise[s]) for s in range(3)]
    recs += [rec("e02", "vflip", s, 26.0 + s - noise[s]) for s in range(3)]
    recs += [dict(rec("e04", "clip_star", s, 30.0 + s), reused_from="e02/clip_star") for s in range(3)]
    recs += [dict(rec("e04", "image_pool", s, 29.3 + s + noise[s]), reused_from="e02/pool") for s in range(3)]
    recs += [rec("e04", "text_bt+rd", s, 30.2 + s + 0.1 * noise[s]) for s in range(3)]
    for r in recs: atomic_write_json(record_path(tmp_path / "study", r["exp"], r["name"], r["seed"]), r)
    tables = build_report([tmp_path / "study"], tmp_path / "report", figures=False, sections=tbps_experiments.REPORT_SECTIONS)
    t2 = {m["name"]: m for m in tables[(str(tmp_path / "study"), "table2")]}
    t4 = {m["name"]: m for m in tables[(str(tmp_path / "study"), "table4")]}
    assert (t2["pool"]["ours_effect"], t2["pool"]["se"], t2["pool"]["mark"]) == (t4["image_pool"]["ours_effect"], t4["image_pool"]["se"], t4["image_pool"]["mark"])
    assert t2["pool"]["key"] == t4["image_pool"]["key"] == ["e02/pool", "e02/clip_star"]
    sd = ((2 * 0.16 + 2 * 0.16 + 2 * 0.0016) / 6) ** 0.5  # pool, vflip, text_bt+rd: the reused pool is counted once
    assert t2["vflip"]["se"] == pytest.approx(sd / 3 ** 0.5) and t4["text_bt+rd"]["se"] == t2["vflip"]["se"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.count("one s for the whole study") == 1 and "all ablations (main tables, presets, batch size)" in md
    assert tbps_experiments.study_sd(tmp_path / "study")[1] == 6
    assert tbps_experiments.notebook_marks(tmp_path / "study", "table4") == tables[(str(tmp_path / "study"), "table4")]


# ---- the layout: records written before the split, the paper's numbers as package data --------------------------------

V2 = ["results/study/synthpedes-v2", "results/study/synthpedes-v2-2000steps", "results/study/synthpedes-v2-fewshot-5epochs",
      "results/study/synthpedes-v2-2proc"]


def test_records_written_before_the_split_still_build_every_table(tmp_path, monkeypatch):
    "The v2 study's records (written by the one-module study.py) build every table with today's marks (its committed report keeps the old rule)."
    from tbps_clip.study.report import build_report
    monkeypatch.chdir(ROOT)  # the report names its sources as e99 was given them: relative to the checkout
    tables = build_report(V2, tmp_path, figures=False, sections=tbps_experiments.REPORT_SECTIONS)
    assert {t for s, t in tables if s == V2[0]} >= {"table1", "table2_appendix", "table5", "table6_8-tbps-tiny", "table10", "table11-0.01", "table12"}
    assert all(m["mark"] for ms in tables.values() for m in ms) and len((tmp_path / "report.md").read_text().splitlines()) > 200
    committed = (ROOT / "results/study/synthpedes-v2/report/report.md").read_text()
    assert "Study report" in committed  # the v2 report stays as it was made (history), beside these records


def test_the_papers_numbers_ship_with_the_package(tmp_path):
    "`pip install .` (a wheel) carries tbps_clip/study/paper.yaml, and the installed module reads it."
    pytest.importorskip("setuptools"); pytest.importorskip("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import zipfile
    (whl,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "tbps_clip/study/paper.yaml" in names and "tbps_clip/study/paper.py" in names
    text = zipfile.ZipFile(whl).read("tbps_clip/study/paper.yaml").decode()
    from tbps_clip.study.paper import read_paper
    assert read_paper(text) == PAPER and PAPER["table1"]["source"].endswith("Table 1")


# ---- concurrent runs, Slurm through submitit, parameters a notebook does not declare ------------------------------------

TIMING = ("encode_s", "rank_s")


def small_sweep(tmp_path, **extra):
    "e01 (three rows) and e04 (whose CLIP* is e01's) at smoke scale: six trainings, one reuse across notebooks."
    import yaml
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(dict(notebooks_dir=str(ROOT / "experiments"), params={"scale": "smoke", "seeds": [0]},
                                     notebooks=[{"notebook": "e01_tricks", "params": {"rows": ["clip", "dropout", "clip_star"]}},
                                                "e04_both_aug"], **extra)))
    return f


def same_records(a, b):
    "The records of two results folders, equal but for timings and where they were written."
    ra, rb = load_records(a), load_records(b)
    key = lambda r: (r["exp"], r["name"], r["seed"], r["steps"], r.get("reused_from"), r["fingerprint"],
                     {k: v for k, v in r["metrics"].items() if k not in TIMING})
    assert [key(r) for r in ra] == [key(r) for r in rb]
    return ra


@pytest.mark.slow
def test_two_jobs_write_the_records_of_a_serial_run(tmp_path, kernel_env, capsys):
    "`study run --jobs 2`: the runs train two at a time in their own processes; records and notebook status equal a serial run's."
    from tbps_clip.cli import main
    sweep = small_sweep(tmp_path)
    serial = run_sweep(sweep, out=tmp_path / "serial", log=None)
    assert main(["study", "run", str(sweep), "--out", str(tmp_path / "jobs"), "--jobs", "2", "--allow-dirty"]) == 0
    recs = same_records(tmp_path / "serial", tmp_path / "jobs")
    assert len(recs) == 7 and [r["name"] for r in recs if r.get("reused_from")] == ["clip_star"]
    logs = sorted((tmp_path / "jobs" / "jobs").glob("*.log"))
    assert len(logs) == 6 and not (tmp_path / "serial" / "jobs").exists()  # six trainings, each its own process
    assert all(json.loads(p.with_suffix(".json").read_text())["target"] == "tbps_clip.study.runs:run_once" for p in logs)
    params = lambda out: sorted(json.dumps({k: v for k, v in s["params"].items() if k != "out"}) for s in sweep_status(out))
    assert params(tmp_path / "jobs") == params(tmp_path / "serial")  # --jobs is not a notebook parameter: same notebook runs
    assert all(s["status"] == "ok" for s in serial)
    # resumable as before: a serial run over the jobs' folder finds every notebook done, and so does --jobs again
    assert all(r.get("skipped") for r in run_sweep(sweep, out=tmp_path / "jobs", log=None))
    forced = run_sweep(sweep, out=tmp_path / "jobs", log=None, executor=sweep_executor(sweep, "local", 2), force=True)
    assert all(r["status"] == "ok" and not r.get("skipped") for r in forced)
    assert len(list((tmp_path / "jobs" / "jobs").glob("*.log"))) == 6  # forced notebooks ran again, their runs did not


def test_parameters_a_notebook_does_not_declare_are_refused(tmp_path):
    nb = ROOT / "experiments" / "e01_tricks.ipynb"
    with pytest.raises(TBPSError, match=r"^e01_tricks: unknown parameter\(s\) stepz; it declares: dataset, root, .*seeds"):
        run_notebook(nb, {"stepz": 3}, tmp_path / "out")
    sweep = small_sweep(tmp_path)
    with pytest.raises(TBPSError, match=r"sweep.yaml: parameter\(s\) stepz declared by none of its notebooks \(e01_tricks, e04_both_aug\)"):
        run_sweep(sweep, out=tmp_path / "out", set_params={"stepz": 3})
    import yaml
    spec = yaml.safe_load(sweep.read_text())
    spec["notebooks"][1] = {"notebook": "e04_both_aug", "params": {"rowz": ["both"]}}
    sweep.write_text(yaml.safe_dump(spec))
    with pytest.raises(TBPSError, match=r"sweep.yaml: e04_both_aug: unknown parameter\(s\) rowz"):
        run_sweep(sweep, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything ran
    from tbps_clip.study.driver import notebook_parameters
    assert "rows" in notebook_parameters(nb) and "rows" not in notebook_parameters(ROOT / "experiments" / "e99_report.ipynb")


@pytest.mark.slow
def test_slurm_executor_through_submitits_local_executor(tmp_path, kernel_env):
    "`--executor slurm`: each run one submitit job (here submitit's local executor), recorded as locally, resumable."
    pytest.importorskip("submitit", reason="submitit is in the 'slurm' and 'dev' extras")
    from tbps_clip.cli import main
    sweep = small_sweep(tmp_path, slurm={"cluster": "local", "timeout_min": 10, "cpus_per_task": 1, "partition": "ignored-locally"})
    run_sweep(sweep, out=tmp_path / "serial", log=None)
    assert main(["study", "run", str(sweep), "--out", str(tmp_path / "slurm"), "--executor", "slurm", "--allow-dirty"]) == 0
    same_records(tmp_path / "serial", tmp_path / "slurm")
    jobs = sorted((tmp_path / "slurm" / "jobs" / "slurm").glob("*_submitted.pkl"))
    assert len(jobs) == 6  # one job per training run
    assert main(["study", "run", str(sweep), "--out", str(tmp_path / "slurm"), "--executor", "slurm", "--force", "--allow-dirty"]) == 0
    assert len(list((tmp_path / "slurm" / "jobs" / "slurm").glob("*_submitted.pkl"))) == 6  # recorded runs: no new job
    for d in ("b", "c"): (tmp_path / d).mkdir()
    with pytest.raises(TBPSError, match=r"sweep.yaml: unknown slurm setting\(s\) partiton"):
        run_sweep(small_sweep(tmp_path / "b", slurm={"partiton": "gpu"}), out=tmp_path / "x")
    with pytest.raises(TBPSError, match="needs a `slurm` entry"):
        sweep_executor(small_sweep(tmp_path / "c"), "slurm")


# ---- marks from paired differences (the v3 study's marks) -----------------------------------------------------------------

def prec(name, seed, r1, exp="e01"):
    return dict(exp=exp, name=name, seed=seed, scale="study", dataset="synthpedes", synthetic=True, metrics={"R@1": r1, "mAP": r1})


def test_paired_effects_remove_what_the_seed_does_to_both():
    "Seed 1 is 6 points better for every row: across seeds the +1 drowns in seed noise, paired by seed it resolves."
    seed = {0: 0.0, 1: 6.0, 2: 3.0}
    recs = [prec("clip", s, 20 + b) for s, b in seed.items()] + [prec("global_grad", s, 21 + b + (0.1, -0.1, 0.0)[s]) for s, b in seed.items()]
    recs += [prec("dropout", s, 20 + b + (-0.1, 0.1, 0.0)[s]) for s, b in seed.items()]
    g = table_group(recs, "table1")
    sd, dof, marks = mark_groups([g])
    gg = {m["name"]: m for m in marks["table1"]}["global_grad"]
    assert dof == 4 and sd == pytest.approx(0.1) and gg["ours_effect"] == pytest.approx(1.0) and gg["mark"] == "agrees"
    assert gg["se"] == pytest.approx(0.1 / 3 ** 0.5) and gg["resolvable"] == pytest.approx(2 * 0.1 / 3 ** 0.5)
    assert statistics.stdev([r["metrics"]["R@1"] for r in recs if r["name"] == "clip"]) > 2  # the seed-mean comparison could not


def test_a_row_identical_to_the_baseline_is_said_so_and_does_not_shrink_the_pooled_sd():
    "GlobalGrad on one process equals CLIP at every seed: not 'within noise', not counted, and its zero variance pools nothing."
    base = {0: 36.85, 1: 37.07, 2: 36.81}
    recs = [prec("clip", s, v) for s, v in base.items()] + [prec("global_grad", s, v) for s, v in base.items()]
    recs += [prec("dropout", s, v + d) for (s, v), d in zip(base.items(), (-0.97, 0.04, -1.78))]
    recs += [prec("lock_bl", s, v + d) for (s, v), d in zip(base.items(), (-0.68, 0.16, 0.51))]
    sd, dof, marks = mark_groups([table_group(recs, "table1")])
    marked = {m["name"]: m for m in marks["table1"]}
    assert marked["global_grad"]["mark"] == IDENTICAL and marked["global_grad"]["ours_effect"] == 0
    pooled = ((statistics.variance([-0.97, 0.04, -1.78]) + statistics.variance([-0.68, 0.16, 0.51])) / 2) ** 0.5
    assert sd == pytest.approx(pooled) and dof == 4
    assert agreement_summary(marked.values())["rows"] == 2  # the identical row is not counted as a comparison


def test_the_report_gives_tables_forest_plots_what_resolves_and_the_rule_once(tmp_path):
    from tbps_clip.core import atomic_write_json
    recs = [prec("itc", s, 10.0 + s, "e05") for s in range(3)] + [prec("nitc", s, 11.0 + s + (0.05, -0.05, 0)[s], "e05") for s in range(3)]
    recs += [prec("ss_t", s, 10.0 + s + 0.01 * s, "e05") for s in range(3)]
    for r in recs: atomic_write_json(record_path(tmp_path / "study", r["exp"], r["name"], r["seed"]), r)
    tables = build_report([tmp_path / "study"], tmp_path / "report", sections=tbps_experiments.REPORT_SECTIONS)
    marked = {r["name"]: r for r in tables[(str(tmp_path / "study"), "table5")]}
    assert marked["nitc"]["mark"] == "agrees" and marked["ss_t"]["mark"] == "within seed noise"
    assert (tmp_path / "report" / "study" / "figures" / "table5-forest.png").stat().st_size > 5000
    assert "paired by seed" in (tmp_path / "report" / "study" / "tables" / "table5.md").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    assert "### What resolves and agrees" in md and "| table5 | 2 | 1 | 1 |" in md and md.count("one s for the whole study") == 1


def test_the_reports_table9_gives_e07s_interleaved_timing_from_the_source_folder(tmp_path):
    from tbps_clip.core import atomic_write_json
    from tbps_clip.study.report import build_report
    src = tmp_path / "study"
    for name in ("clip", "tbps"):
        r = dict(prec(name, 0, 10.0, "e07"), steps=300, train_seconds=999.0, test_seconds=1.0, params_m=8.0)
        atomic_write_json(record_path(src, "e07", name, 0), r)
    atomic_write_json(src / "tables" / tbps_experiments.TIMING_FILE, dict(step_seconds={"clip": 0.5, "tbps": 1.5}, rounds=8,
                      threads=1, load_average=0.1, machine="x86_64, 2 cores"))
    build_report([src], tmp_path / "report", figures=False, sections=tbps_experiments.REPORT_SECTIONS)
    rows = {r["method"].split(" ")[0]: r for r in csv.DictReader((tmp_path / "report" / "study" / "tables" / "table9.csv").open())}
    assert (float(rows["clip"]["train_seconds_alone"]), float(rows["tbps"]["train_seconds_alone"])) == (150.0, 450.0)
    assert "timed alone and interleaved with the other rows (8 steps each" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
def test_gpu_study_script_runs_concurrent_jobs(tmp_path, kernel_env):
    "experiments/gpu_study.sh, tried on the CPU: two runs at once at smoke scale, records equal a serial run's, hardware stated."
    sweep = small_sweep(tmp_path)
    run_sweep(sweep, out=tmp_path / "serial", log=None)
    env = {**os.environ, "JOBS": "2", "DEVICE": "cpu", "SCALE": "smoke", "PY": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "experiments" / "gpu_study.sh"), str(sweep), str(tmp_path / "gpu")], env=env,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2 of 2 notebook(s) ok" in r.stdout
    recs = same_records(tmp_path / "serial", tmp_path / "gpu")
    assert all(r["config"]["train"]["device"] == "cpu" for r in recs)
    assert len(list((tmp_path / "gpu" / "jobs").glob("*.log"))) == 6  # six trainings, two at a time
    hw = (tmp_path / "gpu" / "HARDWARE.txt").read_text()
    assert hw.startswith("device: cpu; jobs at once: 2") and "finished in" in hw


def test_compression_compares_drop_and_freeze_with_the_full_model():
    "e11: drop@x and freeze@x against full at the same seeds, as the paper compares them; freeze vs drop an extra, uncounted row."
    from tbps_experiments import compression_specs
    r1 = {("full", 0): 36.0, ("full", 1): 37.0, ("full", 2): 35.0,
          ("drop@1", 0): 34.0, ("drop@1", 1): 35.5, ("drop@1", 2): 32.5,      # -2, -1.5, -2.5 against full
          ("freeze@1", 0): 35.9, ("freeze@1", 1): 37.2, ("freeze@1", 2): 34.8}  # -0.1, +0.2, -0.2 against full
    recs = [dict(exp="e11", name=n, seed=s, metrics={"R@1": v}) for (n, s), v in r1.items()]
    specs = compression_specs({r["name"] for r in recs})
    assert [(c["row"], c["against"], c["paper"], c.get("counted", True)) for c in specs] == [
        ("drop@1", "full", LOWER, True), ("freeze@1", "full", NO_CHANGE, True), ("freeze@1", "drop@1", "higher", False)]
    sd, _ = pooled_paired_sd([(recs, c["row"], c["against"]) for c in specs])
    rows = {m["name"]: m for m in compare(recs, specs, sd)}
    assert rows["drop@1"]["mark"] == "agrees" and rows["drop@1"]["ours_effect"] == pytest.approx(-2.0)
    assert rows["freeze@1"]["mark"] == "agrees" and rows["freeze@1"]["paper_claim"] == NO_CHANGE  # no resolved change
    assert rows["freeze@1-vs-drop"]["mark"] == "agrees" and rows["freeze@1-vs-drop"]["ours_effect"] == pytest.approx(5.9 / 3)
    s = agreement_summary(rows.values())  # the extra row is shown, not counted; the no-change claim is counted apart
    assert (s["rows"], s["resolved"], s["agree"], s["no_change_claims"], s["no_change_held"]) == (1, 1, 1, 1, 1)
    changed = compare(recs, [dict(row="drop@1", against="full", paper=NO_CHANGE)], sd)[0]
    assert changed["mark"] == "disagrees"  # a resolved change against a claim of none


def test_an_appendix_sweep_alone_builds_its_tables(tmp_path, kernel_env):
    "e03 run with only an appendix row into a folder without its main rows: the empty main table says so (it failed before)."
    st = run_notebook(ROOT / "experiments" / "e03_text_aug.ipynb", dict(scale="smoke", seeds=[0], rows=["bt@0.2"]), tmp_path, log=None)
    assert st["status"] == "ok", st.get("error")
    assert "(no rows)" in (tmp_path / "tables" / "table3.md").read_text()
    assert "| BT alpha 0.2 | clip_star |" in (tmp_path / "tables" / "table3_appendix.md").read_text()


# ---- e13: the regime map's reading of its records --------------------------------------------------------------

def _map_rec(preset, n, seed, r1, fit=None):
    return dict(exp="e13", name=f"{preset}@{n}", seed=seed, metrics={"R@1": r1}, fit={"R@1": fit} if fit is not None else None)


def _map_records(effects: dict, noise=(0.3, -0.1, -0.2), clip_fit=None):
    "Records of clip and two presets at N = 100, 200, 400, seeds 0-2: each preset's R@1 = clip's + effect[N] + a seed's noise."
    clip_fit = clip_fit or {100: 99.0, 200: 92.0, 400: 70.0}
    recs = []
    for n in (100, 200, 400):
        for s in range(3):
            base = 30.0 + s
            recs.append(_map_rec("clip", n, s, base, clip_fit[n] + s * 0.1))
            for p, eff in effects.items(): recs.append(_map_rec(p, n, s, base + eff[n] + noise[s] * (1 if p == "a" else -1), 50.0))
    return recs


def test_regime_map_effects_fit_rule_sign_change_and_readings():
    from tbps_experiments import fit_rule, regime_effects, regime_readings, sign_change, spearman
    recs = _map_records({"a": {100: 3.0, 200: 1.0, 400: -2.0}, "b": {100: -1.0, 200: -1.5, 400: -2.0}})
    eff = regime_effects(recs)
    a = {r["N"]: r for r in eff if r["preset"] == "a"}
    assert a[100]["effect"] == pytest.approx(3.0) and a[400]["effect"] == pytest.approx(-2.0)
    assert a[100]["se"] is not None and a[100]["se"] == {r["N"]: r for r in eff if r["preset"] == "b"}[100]["se"]  # pooled over the presets at that N
    assert a[100]["clip_fit"] == pytest.approx(99.1) and a[100]["fit"] == 50.0
    rule = fit_rule(recs, 90.0)
    assert rule["n_star"] == 200 and rule["clip_fit"][400] == pytest.approx(70.1)
    assert fit_rule(recs, 99.5)["n_star"] is None  # no N reaches it
    sc = sign_change(eff, "a")
    assert sc["sign_change_N"] == pytest.approx(200 + 200 * 1.0 / 3.0) and sc["where"] == "changes sign"
    assert sc["positive_resolved_up_to"] == 200 and sc["negative_resolved_from"] == 400
    assert sign_change(eff, "b")["where"] == "not positive at any N" and sign_change(eff, "b")["sign_change_N"] is None
    rd = regime_readings(eff, ["a", "b"])
    assert rd["a"]["reading"] == "supported" and rd["a"]["spearman_fit_effect"] == pytest.approx(1.0)
    assert rd["b"]["reading"] == "refuted"  # not positive where clip fits
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0) and spearman([1, 1, 1], [1, 2, 3]) is None
    # an effect that stays positive but does not fall with fit: inconclusive at best, refuted when it rises as fit falls
    rising = regime_effects(_map_records({"c": {100: 1.0, 200: 2.0, 400: 3.0}, "a": {100: 3.0, 200: 1.0, 400: -2.0}}))
    assert regime_readings(rising, ["c"])["c"]["reading"] == "refuted"


def test_regime_rows_are_nested_fractions_and_refuse_a_bad_n():
    from tbps_experiments import regime_rows
    rows = regime_rows(["clip", "tbps"], [100, 350, 1000], 1000)
    assert rows["clip@100"] == ("clip", {"data.fewshot": 0.1}) and rows["tbps@1000"] == ("tbps", {"data.fewshot": 0.0})
    from tbps_clip.data import fewshot_pids
    assert len(fewshot_pids(range(1000), rows["clip@350"][1]["data.fewshot"])) == 350
    with pytest.raises(TBPSError, match="1..1000"): regime_rows(["clip"], [0, 1200], 1000)


# ---- study v4 against v3: its reading ------------------------------------------------------------------------------

def test_v4_reading_follows_the_rule_fixed_before_its_runs():
    "Supported: more agreement than v3 and above one half; refuted: no more than v3; inconclusive between, or nothing resolved."
    from tbps_experiments import MAIN_ABLATIONS, fit_explanation_reading
    row = lambda resolved, agree: [dict(table=MAIN_ABLATIONS, rows=39, resolved=resolved, agree=agree)]
    v3 = row(11, 3)
    assert fit_explanation_reading(v3, row(10, 7))["reading"] == "supported"
    assert fit_explanation_reading(v3, row(10, 4))["reading"] == "inconclusive"   # higher than 3/11 but not above one half
    assert fit_explanation_reading(v3, row(22, 6))["reading"] == "refuted"        # 6/22 equals 3/11: no higher
    assert fit_explanation_reading(v3, row(0, 0))["reading"] == "inconclusive"
    r = fit_explanation_reading(v3, row(4, 3))
    assert (r["before"], r["after"], r["after_rate"]) == ("3 of 11 resolved agree", "3 of 4 resolved agree", 0.75)
    with pytest.raises(TBPSError, match="no agreement row"):
        fit_explanation_reading(v3, [dict(table="table1", rows=4, resolved=1, agree=0)])


def test_the_report_over_two_studies_sets_them_side_by_side_and_applies_the_reading(tmp_path, kernel_env):
    "e99 over a 'before' and an 'after' folder: the agreement side by side in report.md, and v4's reading of the two in readings.json."
    from tbps_clip.core import atomic_write_json
    for folder, gain in (("before", -3.0), ("after", 3.0)):  # GlobalGrad costs R@1 before and helps after (the paper: it helps)
        for s in range(3):
            for r in (prec("clip", s, 10.0 + s, "e01"), prec("global_grad", s, 10.0 + s + gain + 0.1 * s, "e01")):
                atomic_write_json(record_path(tmp_path / folder, r["exp"], r["name"], r["seed"]), r)
    srcs = [str(tmp_path / "before"), str(tmp_path / "after")]
    st = run_notebook(ROOT / "experiments" / "e99_report.ipynb", dict(sources=srcs, readings=["fit_explanation"]), tmp_path / "out", log=None)
    assert st["status"] == "ok", st.get("error")
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "## Across the folders" in md and "| before: resolve / agree |" in md and "## Readings fixed before the runs" in md
    said = json.loads((tmp_path / "out" / "report" / "readings.json").read_text())
    assert [(r["rule"], r["reading"], r["before"], r["after"]) for r in said] == [
        ("fit_explanation", "supported", "0 of 1 resolved agree", "1 of 1 resolved agree")]
    assert said[0]["final"] == "no, provisional (before: its sweep has not reached its report; after: its sweep has not reached its report)"
    for folder, status in (("before", "ok"), ("after", "ok"), ("after", "failed")):  # both swept to their report; then one notebook failed
        atomic_write_json(tmp_path / folder / "sweep" / f"{'e99_report' if status == 'ok' else 'e01_tricks'}-0.json",
                          dict(notebook=f"experiments/{'e99_report' if status == 'ok' else 'e01_tricks'}.ipynb", status=status))
        if folder == "after":
            st = run_notebook(ROOT / "experiments" / "e99_report.ipynb", dict(sources=srcs, readings=["fit_explanation"]), tmp_path / "out", force=True, log=None)
            said = json.loads((tmp_path / "out" / "report" / "readings.json").read_text())
            assert said[0]["final"] == ("yes" if status == "ok" else "no, provisional (after: notebooks not finished: e01_tricks)"), said

# ---- the probes' rows, built by their experiments' code ------------------------------------------------------------------

def test_the_probes_build_their_rows():
    from tbps_clip.config import make_config
    from tbps_experiments import FEWSHOT_METHODS, TABLE12_IDS, batch_size_rows, compression_rows, fewshot_rows
    assert fewshot_rows([0.05], ["coop"]) == {"coop@0.05": ("clip", {"model.probe": "coop", "data.fewshot": 0.05})}
    assert len(fewshot_rows((0.01, 0.05, 0.1))) == 3 * len(FEWSHOT_METHODS) == 15
    assert list(compression_rows({0: [], 1: [2]})) == ["full", "drop@1", "freeze@1"] and len(compression_rows(TABLE12_IDS)) == 11
    assert compression_rows({0: (), 1: (7,)})["freeze@1"] == ("tbps", {"train.freeze_text_layers": [7]})
    assert batch_size_rows(64, 100)["half"] == ("simplified", {"data.batch_size": 32, "train.grad_cache_chunk": 0, "train.max_steps": 200})
    with pytest.raises(TBPSError, match=r"must lie in \(0, 1\]"): fewshot_rows([0.0])
    with pytest.raises(TBPSError, match="x=2 needs 2 layer ids"): compression_rows({2: [1]})
    with pytest.raises(TBPSError, match="even"): batch_size_rows(3, 0)
    for rows in (fewshot_rows((0.1,)), compression_rows(TABLE12_IDS), batch_size_rows(64, 0)):
        for preset, ov in rows.values(): make_config(preset, ov)  # every row is a valid configuration
    t = PAPER["table12_batch"]  # e12's paper rows are named as its rows
    assert t["baseline"] in t["rows"] and set(t["rows"]) <= set(batch_size_rows(2, 0))
