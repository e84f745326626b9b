"""Matmul peak of this machine: FLOP/s of a large square GEMM (fp32 on the CPU; fp32, tf32 and bf16 on CUDA).

    python benchmarks/cpu_peak.py [--threads 1] [--n 4096] [--repeat 5]

The best of --repeat timed multiplications (after a warm-up) of two n x n matrices, 2 n^3 FLOPs each. The
training benchmark divides its achieved model FLOP/s by this figure (fraction of peak); on a shared machine
the best-of-n is the closest to what the cores can do. Writes benchmarks/results/cpu_peak.json/.txt.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import fmt_table, load_average, machine, write_results  # noqa: E402

import torch  # noqa: E402


def gemm_peak(n: int = 4096, repeat: int = 5, device: str = "cpu", dtype=torch.float32) -> float:
    "Best FLOP/s of `repeat` n x n x n matrix multiplications on `device` in `dtype`."
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b; sync()  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b; sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = [["cpu", "fp32", a.threads, gemm_peak(a.n, a.repeat) / 1e9]]
    if torch.cuda.is_available():
        prev = torch.backends.cuda.matmul.allow_tf32
        for name, dt, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            rows.append(["cuda", name, "", gemm_peak(8192, a.repeat, "cuda", dt) / 1e9])
        torch.backends.cuda.matmul.allow_tf32 = prev
    else:
        print("no CUDA: GPU peak skipped")
    rec = dict(machine=machine(), n=a.n, repeat=a.repeat, load_average=load_average(),
               peaks=[dict(device=r[0], dtype=r[1], threads=r[2], gflops=round(r[3], 2)) for r in rows])
    table = (f"{rec['machine']['cpu']}, {rec['machine']['cpus']} cores, torch {torch.__version__}; "
             f"load average {rec['load_average']}\n" + fmt_table(["device", "dtype", "threads", "GFLOP/s"], rows))
    print(table)
    write_results("cpu_peak", rec, table)
    return rec


if __name__ == "__main__":
    main()
