"""Start-up time of the `tbps-clip` command: the bare command, --version, every --help and configuration errors.

    python benchmarks/cli_startup.py [--runs 7] [--before REF] [--name cli_startup]

Each command runs as a whole process (`python -m tbps_clip.cli ...`, this tree on PYTHONPATH), in rounds: every
round runs `python -c pass` (the interpreter's own start-up, the floor) and then each command once, so a change in
the machine's load reaches all of them alike. Printed per command: the median, min and max wall seconds, the median
minus the floor, its exit status, and whether the process imported torch (read with `-X importtime` in one extra
run). With --before REF the same commands also run against the package as of git REF (its tbps_clip/ extracted with
`git archive` into a temporary folder), interleaved in the same rounds. Writes benchmarks/results/<name>.json and .txt.
"""
import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

COMMANDS = [
    ("tbps-clip", []), ("--version", ["--version"]), ("--help", ["--help"]),
    *[(f"{c} --help", [c, "--help"]) for c in
      ("synth", "pretrain", "train", "eval", "prep", "demo", "config", "index", "search", "serve", "study")],
    *[(f"study {c} --help", ["study", c, "--help"]) for c in ("run", "collect", "status")],
    ("prep cuhk-pedes --help", ["prep", "cuhk-pedes", "--help"]),
    ("config error: value", ["config", "data.batch_size=0"]),
    ("config error: unknown key", ["train", "data.batchsize=32"]),
    ("config error: preset", ["train", "--preset", "clip-star"]),
    ("config error: type", ["demo", "optim.lr=fast"]),
]


def run_once(argv: list, path: str) -> tuple:
    "(wall seconds, exit status) of one process."
    env = dict(os.environ, PYTHONPATH=path)
    t0 = time.perf_counter()
    r = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    return time.perf_counter() - t0, r.returncode


def imports_torch(args: list, path: str) -> bool:
    "Whether `tbps-clip ARGS` imports torch (one run with -X importtime)."
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tbps_clip.cli", *args], env=dict(os.environ, PYTHONPATH=path),
                       capture_output=True, text=True, cwd=tempfile.gettempdir())
    return any(line.startswith("import time:") and line.split("|")[-1].strip() == "torch" for line in r.stderr.splitlines())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7, help="rounds (each runs every command once)")
    p.add_argument("--before", help="also time the package as of this git ref (default: only this tree)")
    p.add_argument("--name", default="cli_startup", help="results file name")
    a = p.parse_args(argv)
    trees = {"now": str(ROOT)}
    tmp = None
    if a.before:
        tmp = tempfile.mkdtemp(prefix="cli-startup-before-")
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", a.before, "tbps_clip"], check=True, capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as t: t.extractall(tmp, filter="data")
        trees = {"before": tmp, **trees}
    try:
        floor, times, codes = [], {(t, n): [] for t in trees for n, _ in COMMANDS}, {}
        for _ in range(a.runs):
            floor.append(run_once([sys.executable, "-c", "pass"], str(ROOT))[0])
            for n, args in COMMANDS:
                for t, path in trees.items():
                    s, rc = run_once([sys.executable, "-m", "tbps_clip.cli", *args], path)
                    times[t, n].append(s); codes[t, n] = rc
        torch_used = {(t, n): imports_torch(args, path) for t, path in trees.items() for n, args in COMMANDS}
    finally:
        if tmp: shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(floor)
    rows = [dict(tree=t, command=n, median_s=round(statistics.median(times[t, n]), 3), min_s=round(min(times[t, n]), 3),
                 max_s=round(max(times[t, n]), 3), over_python_s=round(statistics.median(times[t, n]) - base, 3),
                 exit=codes[t, n], imports_torch=torch_used[t, n]) for n, _ in COMMANDS for t in trees]
    lines = [f"python -c pass: median {base:.3f} s (min {min(floor):.3f}, max {max(floor):.3f}); {a.runs} rounds; "
             f"load average {[round(x, 2) for x in os.getloadavg()]}",
             f"{'command':<28} {'tree':<7} {'median s':>9} {'min':>7} {'max':>7} {'- python':>9} {'exit':>5}  torch"]
    lines += [f"{r['command']:<28} {r['tree']:<7} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['max_s']:7.3f} "
              f"{r['over_python_s']:9.3f} {r['exit']:5d}  {'imported' if r['imports_torch'] else 'no'}" for r in rows]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rec = dict(python_pass=dict(median_s=round(base, 3), runs=[round(x, 3) for x in floor]), rows=rows, runs=a.runs,
               before=a.before, cpu_count=os.cpu_count(), load_average=[round(x, 2) for x in os.getloadavg()],
               python=sys.version.split()[0], when=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    from tbps_clip.core import atomic_write_json, atomic_write_text  # after the timings: a killed run leaves the old record whole
    atomic_write_json(RESULTS / f"{a.name}.json", rec)
    atomic_write_text(RESULTS / f"{a.name}.txt", text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
