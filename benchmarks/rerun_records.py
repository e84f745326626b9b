"""Retrain recorded study runs from their stored configurations and compare the metrics exactly: does the code here
train as the code that made each record did?

Used for the v3 study's records whose commits are not in the repository (results/study/synthpedes-v3/provenance.json).
Equal code gives bit-identical results only on a CPU with the same vector kernels, so the comparison that tells
whether two commits train alike is two reruns of one record on one machine, one at each commit (run this script from
a checkout of each); the recorded metrics show whether this machine reproduces the machine that made the record.
Each rerun trains from scratch into a temporary folder (one thread) and appends one entry, with this machine's CPU.

    PYTHONPATH=$PWD python benchmarks/rerun_records.py RECORD.json [...] --record results/study/synthpedes-v3/provenance-reruns.json
"""
import argparse, json, tempfile, time
from pathlib import Path

METRICS = ("R@1", "R@5", "R@10", "mAP", "mINP")


def rerun(path: Path, work: Path) -> dict:
    "Train the configuration of the record at `path` again; its metrics beside the record's."
    from tbps_clip.config import config_from_dict
    from tbps_clip.run import train
    from tbps_clip.study.runs import read_record
    rec = read_record(path)
    if rec.get("reused_from"): raise SystemExit(f"{path}: a reused record names another run ({rec['reused_from']}); rerun that one")
    cfg = config_from_dict(rec["config"], f"{path} (config)")
    cfg.out_dir = str(work / path.parent.name / path.stem)
    cfg.train.threads = 1
    t0 = time.perf_counter()
    res = train(cfg, progress=False)
    same = {m: rec["metrics"][m] == res["metrics"][m] for m in METRICS}
    import torch
    from tbps_clip.core import cpu_model, git_commit
    return dict(record=str(path), exp=rec["exp"], name=rec["name"], seed=rec["seed"], record_commit=rec.get("git_commit"),
                rerun_commit=res.get("git_commit") or git_commit(), equal=all(same.values()), equal_by_metric=same,
                rerun_cpu=dict(model=cpu_model(), capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads()),
                record_metrics={m: rec["metrics"][m] for m in METRICS}, rerun_metrics={m: res["metrics"][m] for m in METRICS},
                rerun_seconds=round(time.perf_counter() - t0, 1))


def _here() -> str:
    "The commit of the code that reruns (the tbps_clip on the path)."
    from tbps_clip.core import git_commit
    return git_commit()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="+", type=Path)
    ap.add_argument("--record", required=True, help="where the comparison is written (JSON)")
    args = ap.parse_args()
    from tbps_clip.core import atomic_write_json
    out = Path(args.record)
    done = json.loads(out.read_text())["reruns"] if out.is_file() else []
    with tempfile.TemporaryDirectory() as work:
        for p in args.records:
            if any(d["record"] == str(p) and d["rerun_commit"] == _here() for d in done): continue  # resumable: kept one by one
            d = rerun(p, Path(work))
            done.append(d)
            print(f"{p}: {'equal' if d['equal'] else 'DIFFERENT'} (R@1 {d['record_metrics']['R@1']} recorded, {d['rerun_metrics']['R@1']} now; "
                  f"{d['rerun_seconds']:.0f} s)", flush=True)
            atomic_write_json(out, dict(what=__doc__.split("\n")[0], reruns=done))


if __name__ == "__main__":
    main()
