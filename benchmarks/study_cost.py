"""What a study run costs, before (first analogue: tbps-tiny, 625 steps) and after (second: tbps-tiny-cs at the
calibrated budget), measured in one process on the same machine (synthetic data; a benchmark, not a test).

For each (arch, preset) it times `--steps` training steps as the study runs them (one thread, the preset's own
data loader with no workers: loading, augmentation, tokenising and the step itself), after one warm-up step,
and splits the time into loading and stepping. The cost of a run is the median time per step times the
setting's step budget (evaluation excluded: the same for every row). Whole runs at the new budget are timed by
`calibrate_analogue.py` (`results/analogue/calibration.json`).

    PYTHONPATH=$PWD python benchmarks/study_cost.py [--steps 12] [--after-steps 300]
"""
import argparse, statistics, sys, time
from pathlib import Path

import torch

from bench_common import machine, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))  # the experiments' own code (e07's timing)


def time_steps(arch: str, preset: str, n: int) -> dict:
    "Median seconds per step of loading and of stepping, for `preset` on `arch` (random weights: cost only)."
    from tbps_experiments import timing_trainer  # e07's trainer for timing: the benchmark times what Table 9 times
    tr = timing_trainer(preset, {"model.arch": arch, "data.batch_size": 64}, threads=1)
    it = iter(tr.loader(0, 0))
    load, step = [], []
    for i in range(n + 1):
        t0 = time.perf_counter(); b = next(it); t1 = time.perf_counter(); tr.train_step(b); t2 = time.perf_counter()
        if i: load.append(t1 - t0); step.append(t2 - t1)  # the first is the warm-up
    return dict(load_s=statistics.median(load), step_s=statistics.median(step))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12); ap.add_argument("--before-steps", type=int, default=625)
    ap.add_argument("--after-steps", type=int, default=300); ap.add_argument("--name", default="study_cost")
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = {"before (tbps-tiny)": ("tbps-tiny", args.before_steps), "after (tbps-tiny-cs)": ("tbps-tiny-cs", args.after_steps)}
    rows = []
    for label, (arch, budget) in settings.items():
        for preset in ("clip", "tbps"):
            t = time_steps(arch, preset, args.steps)
            per = t["load_s"] + t["step_s"]
            rows.append(dict(setting=label, preset=preset, budget_steps=budget, **{k: round(v, 3) for k, v in t.items()},
                             s_per_step=round(per, 3), run_minutes=round(per * budget / 60, 2)))
    head = f"{'setting':<22} {'preset':<6} {'steps':>5} {'load s':>7} {'step s':>7} {'s/step':>7} {'run min':>8}"
    lines = [head] + [f"{r['setting']:<22} {r['preset']:<6} {r['budget_steps']:>5} {r['load_s']:>7.3f} {r['step_s']:>7.3f} "
                      f"{r['s_per_step']:>7.3f} {r['run_minutes']:>8.2f}" for r in rows]
    m = machine()
    lines.append(f"one thread; load average {m.get('load_average')}; {m.get('cpu')}; synthetic data (SynthPEDES)")
    print("\n".join(lines))
    write_results(args.name, dict(rows=rows, machine=m, args=vars(args)), "\n".join(lines))


if __name__ == "__main__":
    main()
