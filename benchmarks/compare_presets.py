"""Train several presets at the same step budget and seeds on the embedded SynthPEDES; print R@1 / mAP (synthetic).

    TBPS_CLIP_CACHE=... python benchmarks/compare_presets.py --steps 250 --seeds 0 1 --out runs/compare

Every run is a study run (`tbps_clip.study.runs.run_once`: its record in OUT/records/compare/, its folder with
config, history and log in OUT/runs/compare/; a finished run is reused); the table gives mean and spread (sample standard deviation) over seeds. Budgets are in steps:
the machines are shared, wall time is not comparable.
"""
import argparse
import statistics
import sys
from pathlib import Path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["clip", "clip_star", "simplified", "tbps"])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    a = p.parse_args()
    from tbps_clip.config import dataset_label, parse_overrides
    from tbps_clip.study.runs import run_once
    out = Path(a.out)
    recs = {}
    for seed in a.seeds:
        for preset in a.presets:
            overrides = {"train.max_steps": a.steps, "train.eval_every": 0, **parse_overrides(a.overrides)}
            rec = run_once("compare", preset, preset, overrides, seed, "custom", out)
            recs.setdefault(preset, []).append(rec)
            m = rec["metrics"]
            print(f"{preset:>11} seed {seed}: R@1 {m['R@1']:.2f}  mAP {m['mAP']:.2f}  ({rec['steps']} steps, "
                  f"{rec['train_seconds']:.0f} s)", flush=True)
    synthetic = all(r["synthetic"] for rs in recs.values() for r in rs)
    datasets = "/".join(sorted({r["dataset"] for rs in recs.values() for r in rs}))
    head = (f"{dataset_label(datasets, synthetic)} test, text-to-image, {a.steps} steps, "
            f"seeds {', '.join(map(str, a.seeds))}: mean (sd)")
    lines = [head, f"{'preset':>11}  {'R@1':>13}  {'mAP':>13}"]
    summary = {}
    for preset, rs in recs.items():
        r1, mp = [r["metrics"]["R@1"] for r in rs], [r["metrics"]["mAP"] for r in rs]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan")
        summary[preset] = dict(R1=r1, mAP=mp, R1_mean=statistics.mean(r1), R1_sd=sd(r1), mAP_mean=statistics.mean(mp), mAP_sd=sd(mp))
        lines.append(f"{preset:>11}  {statistics.mean(r1):6.2f} ({sd(r1):4.2f})  {statistics.mean(mp):6.2f} ({sd(mp):4.2f})")
    table = "\n".join(lines)
    print(table)
    from tbps_clip.core import atomic_write_json  # a killed run leaves the old record whole
    atomic_write_json(out / "summary.json", dict(table=table, steps=a.steps, seeds=a.seeds, synthetic=synthetic,
                                                overrides=a.overrides, presets=summary))


if __name__ == "__main__":
    sys.exit(main())
