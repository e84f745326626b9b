"""Effect of trick.soft_label_source on retrieval: 'nograd' (the paper's extra pass) vs 'detached', paired by seed.

    python benchmarks/soft_label_effect.py --preset clip_star --steps 300 --seeds 0 1 2 [--threads 1]
                                           [--out runs/soft_label] [--name soft_label_effect] [key=value ...]

Each (seed, source) pair is a study run (`tbps_clip.study.runs.run_once`, experiment `sl`) on the configured data (default: the embedded
SynthPEDES, so figures are SYNTHETIC) with the preset's soft labels; the two runs of a seed share everything
but the source. Prints per-seed test R@1 / mAP and training seconds, the mean (sd) per source and the mean
paired difference (detached - nograd) with its sd; finished runs are reused (their records in OUT/records/sl/). The record
(benchmarks/results/<name>.json/.txt) carries the machine, threads, load average and every run's metrics.
The paired difference decides the default only if it is clearly outside the seed-to-seed spread.
"""
import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import fmt_table, load_average, machine, write_results  # noqa: E402

SOURCES = ("nograd", "detached")


def sd(xs):
    return statistics.stdev(xs) if len(xs) > 1 else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="clip_star", help="a preset with soft labels (clip_star, simplified, tbps)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/soft_label")
    ap.add_argument("--name", default="soft_label_effect")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    from tbps_clip.config import dataset_label, make_config, parse_overrides
    from tbps_clip.core import TBPSError
    from tbps_clip.study.runs import run_dir_of, run_once
    if not make_config(a.preset, a.overrides).trick.soft_label:
        raise TBPSError(f"preset {a.preset!r} (with {a.overrides}) has no soft labels (trick.soft_label=0)")
    out = Path(a.out)
    runs = []
    for seed in a.seeds:
        for src in SOURCES:
            overrides = {"train.max_steps": a.steps, "train.eval_every": 0, "train.threads": a.threads,
                         "trick.soft_label_source": src, **parse_overrides(a.overrides)}
            rec = run_once("sl", f"{a.preset}-{src}", a.preset, overrides, seed, "custom", out)
            run_dir = run_dir_of(out, "sl", f"{a.preset}-{src}", seed)
            m = rec["metrics"]
            runs.append(dict(seed=seed, source=src, R1=m["R@1"], mAP=m["mAP"], train_seconds=rec["train_seconds"],
                             steps=rec["steps"], synthetic=rec["synthetic"], dataset=rec["dataset"], run_dir=str(run_dir)))
            print(f"seed {seed} {src:>8}: R@1 {m['R@1']:.2f}  mAP {m['mAP']:.2f}  ({rec['steps']} steps, "
                  f"{rec['train_seconds']:.0f} s)", flush=True)
    by = {s: [r for r in runs if r["source"] == s] for s in SOURCES}
    diff = [d["R1"] - n["R1"] for n, d in zip(by["nograd"], by["detached"])]
    synthetic = all(r["synthetic"] for r in runs)
    summary = {s: dict(R1_mean=statistics.mean(r["R1"] for r in rs), R1_sd=sd([r["R1"] for r in rs]),
                       mAP_mean=statistics.mean(r["mAP"] for r in rs), mAP_sd=sd([r["mAP"] for r in rs]),
                       train_s_mean=statistics.mean(r["train_seconds"] for r in rs)) for s, rs in by.items()}
    summary["R1_paired_diff_mean"], summary["R1_paired_diff_sd"] = statistics.mean(diff), sd(diff)
    rec = dict(machine=machine(), args=vars(a), synthetic=synthetic, runs=runs, summary=summary,
               load_average_end=load_average())
    head = (f"{dataset_label(runs[0]['dataset'], synthetic)} test, text-to-image; preset {a.preset}, "
            f"{a.steps} steps, seeds {a.seeds}, {a.threads} thread(s); {rec['machine']['cpu']}; load average "
            f"{rec['machine']['load_average']} -> {rec['load_average_end']}")
    rows = [[r["seed"], r["source"], f"{r['R1']:.2f}", f"{r['mAP']:.2f}", f"{r['train_seconds']:.0f}"] for r in runs]
    rows += [["mean (sd)", s, f"{summary[s]['R1_mean']:.2f} ({summary[s]['R1_sd']:.2f})",
              f"{summary[s]['mAP_mean']:.2f} ({summary[s]['mAP_sd']:.2f})", f"{summary[s]['train_s_mean']:.0f}"]
             for s in SOURCES]
    table = "\n".join([head, fmt_table(["seed", "source", "R@1", "mAP", "train s"], rows),
                       f"R@1 detached - nograd, paired by seed: {summary['R1_paired_diff_mean']:+.2f} "
                       f"(sd {summary['R1_paired_diff_sd']:.2f}, {len(diff)} seeds)"])
    print(table)
    write_results(a.name, rec, table)
    return rec


if __name__ == "__main__":
    main()
