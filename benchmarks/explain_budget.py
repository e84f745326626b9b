"""Test one explanation of the v3 study's main disagreement (synthetic): the recipe's rows lose to `clip` at the
300-step budget because its regularisers slow fitting, and the budget stops short of the plateau (calibration.json:
`clip` seed 0 gains 2.4 test R@1 from 300 to 600 steps).

Written before its runs (committed in 1ca92c7, 2026-12-03; its record in 5b8d545), after the e06 / e01 rows were seen;
it adds evidence beside those rows and never replaces them. Prediction if the explanation holds: at twice the budget
(600 steps, seed 0) the paired gap `tbps` minus `clip` (300 steps, seed 0: 35.96 - 36.85 = -0.89) and `clip_star`
minus `clip` (36.13 - 36.85 = -0.72) shrink or turn positive. If they stay as negative or grow, the budget does not
explain them. The 600-step `clip` run is the calibration's `clip-s0-2x` (same configuration; its val evaluations do
not change training: the study's seed-0 `clip` run equals the calibration's seed 0 exactly).

    PYTHONPATH=$PWD python benchmarks/explain_budget.py [--out runs/calibration-lr1e-3]
"""
import argparse, json, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_analogue as cal  # noqa: E402

AT_BUDGET = {"clip": 36.85, "tbps": 35.96, "clip_star": 36.13}  # seed 0, 300 steps: results/study/synthpedes-v3/records


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/calibration-lr1e-3"); ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--record", default="results/analogue/explain_budget.json")
    args = ap.parse_args()
    a = argparse.Namespace(out=args.out, every=50, lr=1e-3, arch="tbps-tiny-cs")
    jobs = [("tbps-s0-2x", "tbps"), ("clip_star-s0-2x", "clip_star")]
    with ThreadPoolExecutor(2) as ex:
        recs = dict(zip([n for n, _ in jobs], ex.map(lambda j: cal.one(a, j[0], j[1], 0, args.steps), jobs)))
    recs["clip-s0-2x"] = json.loads((Path(args.out) / "clip-s0-2x" / "results.json").read_text())
    r1 = {k.split("-s0")[0]: round(v["metrics"]["R@1"], 2) for k, v in recs.items()}
    gaps = {row: dict(at_budget=round(AT_BUDGET[row] - AT_BUDGET["clip"], 2), at_2x=round(r1[row] - r1["clip"], 2))
            for row in ("tbps", "clip_star")}
    out = dict(synthetic=True, what=__doc__.split("\n\n")[0], steps=args.steps, seed=0, test_r1_2x=r1, test_r1_1x=AT_BUDGET,
               gap_vs_clip=gaps, explained={row: g["at_2x"] > g["at_budget"] for row, g in gaps.items()},
               val_curves={k: cal.curve(v) for k, v in recs.items()})
    from tbps_clip.core import atomic_write_json  # a killed run leaves the old record whole
    atomic_write_json(args.record, out)
    print(json.dumps({k: v for k, v in out.items() if k != "val_curves"}, indent=1))


if __name__ == "__main__":
    main()
