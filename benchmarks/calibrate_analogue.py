"""Calibrate the analogue on the plain `clip` row and zero-shot only (synthetic; never on the study's other rows).

Fine-tunes the shipped small CLIP with the `clip` preset on the default SynthPEDES (synthetic) at a step budget,
recording val R@1 every `--every` steps (the learning curve), for seeds 0-4 at the budget and seed 0 at twice it,
and optionally (`--tbps`) one `tbps` run at the budget, timed only (its accuracy is a study row, never read
here); two runs at a time, one thread each (the study's setting on this
2-core machine). Then writes `results/analogue/calibration.json` and the val-curve figure beside it:
zero-shot test R@1, test R@1 of each seed, seed 0's final val R@1 at 1x and 2x, the five-seed sd, the smallest
effect a 3-vs-3 paired comparison resolves (2 standard errors of a paired difference, with the paired sd estimated
as sqrt(2) x the seed sd, i.e. no pairing benefit assumed), the attribute oracle, and minutes per run.

    PYTHONPATH=$PWD python benchmarks/calibrate_analogue.py [--steps 300] [--lr 1e-3] [--out runs/calibration]
Finished runs in --out are reused (an interrupted calibration resumes).
"""
import argparse, json, math, os, statistics, subprocess, sys, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORACLE_TEST_R1 = 86.71  # benchmarks/results/synthpedes_oracle.txt: v2-default test, image-level (SynthPEDES unchanged)


def overrides(args, seed: int, steps: int, preset: str) -> dict:
    "The run's dotted overrides: the study scale's settings with this architecture, learning rate and budget."
    from tbps_clip.study.grid import scale_overrides
    return {**scale_overrides("study", arch=args.arch, steps=steps), "optim.lr": args.lr, "train.seed": seed}


def one(args, name: str, preset: str, seed: int, steps: int) -> dict:
    "Run (or reuse) one training run in a subprocess; its results.json."
    out = Path(args.out) / name
    res = out / "results.json"
    if res.is_file(): return json.loads(res.read_text())
    spec = dict(preset=preset, out=str(out), every=args.every, overrides=overrides(args, seed, steps, preset))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], check=True, env=env,
                   stdout=open(Path(args.out) / f"{name}.log", "w"), stderr=subprocess.STDOUT)
    print(f"{name}: {time.time() - t0:.0f} s", flush=True)
    return json.loads(res.read_text())


def run_one(spec: dict) -> None:
    "Child process: train one run with a val evaluation every `every` steps."
    from tbps_clip.config import make_config
    from tbps_clip.pretrain import EveryNSteps
    from tbps_clip.run import train
    class Curve(EveryNSteps):
        def after_fit(self, t): t.run_eval("final")  # the curve ends at the budget itself
    cfg = make_config(spec["preset"], {**spec["overrides"], "out_dir": spec["out"]})
    train(cfg, resume=True, progress=False, callbacks=[Curve(spec["every"])], zero_shot=spec["preset"] == "clip")


def curve(rec: dict) -> list:
    "(step, val R@1) of a run's history."
    return [(e["step"], e["R@1"]) for e in rec["val_history"]]


def main():
    from tbps_clip.study.grid import SCALES
    study = SCALES["study"]  # the budget, learning rate and architecture default to the study scale's
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=study["steps"]); ap.add_argument("--lr", type=float, default=study["overrides"]["optim.lr"])
    ap.add_argument("--arch", default=study["arch"]); ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=5); ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="runs/calibration"); ap.add_argument("--record", default="results/analogue")
    ap.add_argument("--tbps", action="store_true", help="also time one tbps run at the budget (else see study_cost.py)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one: return run_one(json.loads(args.one))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    B = args.steps
    jobs = [(f"clip-s{s}", "clip", s, B) for s in range(args.seeds)] + [("clip-s0-2x", "clip", 0, 2 * B)]
    if args.tbps: jobs.append(("tbps-s0", "tbps", 0, B))
    jobs.sort(key=lambda j: -j[3] * (3 if j[1] == "tbps" else 1))  # longest first: the pool ends together
    with ThreadPoolExecutor(args.jobs) as ex:
        recs = dict(zip([j[0] for j in jobs], ex.map(lambda j: one(args, *j), jobs)))
    clip = [recs[f"clip-s{s}"] for s in range(args.seeds)]
    r1 = [round(r["metrics"]["R@1"], 2) for r in clip]
    sd = statistics.stdev(r1)
    val1, val2 = curve(recs["clip-s0"])[-1][1], curve(recs["clip-s0-2x"])[-1][1]
    cal = dict(synthetic=True, arch=args.arch, weights="synthclip (shipped)", study_steps=B, lr=args.lr, batch_size=64,
               zero_shot_r1=round(clip[0]["zero_shot"]["R@1"], 2), clip_r1=r1, clip_r1_mean=round(statistics.mean(r1), 2),
               clip_r1_sd=round(sd, 2), clip_val_r1_1x=round(val1, 2), clip_val_r1_2x=round(val2, 2),
               clip_val_r1_final=[round(curve(r)[-1][1], 2) for r in clip],
               clip_val_r1_sd=round(statistics.stdev(curve(r)[-1][1] for r in clip), 2),
               plateau_delta=round(val2 - val1, 2), plateau_within_one_sd=abs(val2 - val1) < sd,
               plateau_within_one_val_sd=abs(val2 - val1) < statistics.stdev(curve(r)[-1][1] for r in clip),
               smallest_resolvable_paired_effect_3v3=round(2 * math.sqrt(2) * sd / math.sqrt(3), 2),
               oracle_r1=ORACLE_TEST_R1,
               clip_minutes=round(statistics.median(r["train_seconds"] for r in clip) / 60, 2),
               tbps_minutes=round(recs["tbps-s0"]["train_seconds"] / 60, 2) if args.tbps else None,
               setting="two runs at a time, one thread each, on the project's 2-core CPU; minutes are the runs' "
                       "train_seconds, which include the val evaluations of the curve",
               curves={k: curve(v) for k, v in recs.items() if k.startswith("clip")})
    rec_dir = Path(args.record); rec_dir.mkdir(parents=True, exist_ok=True)
    from tbps_clip.core import atomic_write_json  # a killed run leaves the old record whole
    atomic_write_json(rec_dir / "calibration.json", cal)
    plot(cal, rec_dir / "calibration.png")
    print(json.dumps({k: v for k, v in cal.items() if k != "curves"}, indent=1))


def plot(cal: dict, path: Path) -> None:
    "Val R@1 curves of the calibration runs (synthetic)."
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, c in sorted(cal["curves"].items()):
        ax.plot([s for s, _ in c], [v for _, v in c], marker=".", lw=1.2 if "2x" in name else 0.8, label=name)
    ax.axvline(cal["study_steps"], color="grey", ls=":", lw=1)
    ax.set_xlabel("fine-tuning step (batch 64)"); ax.set_ylabel("val R@1 (%)")
    ax.set_title(f"SynthPEDES (synthetic) val, clip preset from the shipped {cal['arch']}, lr {cal['lr']:g}", fontsize=9)
    ax.legend(fontsize=7); fig.tight_layout(); fig.savefig(path, dpi=120); plt.close(fig)


if __name__ == "__main__":
    main()
