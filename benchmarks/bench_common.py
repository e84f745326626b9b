"""Shared helpers of the benchmark scripts: the machine record, peak memory per phase, and writing results.

Every benchmark records the machine (CPU model, cores, torch version and threads, CUDA device), the load
average next to its figures (the project's CPU machine is shared), and writes JSON + a text table under
benchmarks/results/.
"""
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def load_average() -> list:
    "1, 5 and 15-minute load averages, rounded."
    try: return [round(x, 2) for x in os.getloadavg()]
    except OSError: return []


def machine() -> dict:
    "What a benchmark figure must be read with: hardware, versions, threads, load."
    import torch
    from tbps_clip.core import cpu_model, environment_info, git_commit
    return dict(environment_info(), cpu=cpu_model(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                cuda_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                load_average=load_average(), git_commit=git_commit(ROOT), when=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _status(key: str) -> float:
    "A /proc/self/status memory field in MiB (Linux)."
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"): return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib() -> float: return _status("VmRSS")


class PeakMemory:
    "Peak memory of a phase: RSS high-water mark (reset through /proc/self/clear_refs) or CUDA max allocated."
    def __init__(self, device: str = "cpu"):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        import gc
        gc.collect()
        if self.cuda:
            import torch
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            try:  # '5' resets the peak RSS of this process to its current RSS (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f: f.write("5")
            except OSError: pass
            self.base = rss_mib()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak = _status("VmHWM")
        self.extra = self.peak - self.base  # what the phase added on top of what was already resident
        return False


def write_results(name: str, record: dict, table: str) -> Path:
    "benchmarks/results/<name>.json (the record) and <name>.txt (the table); returns the JSON path."
    from tbps_clip.core import atomic_write_json, atomic_write_text
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{name}.txt", table if table.endswith("\n") else table + "\n")
    return atomic_write_json(RESULTS / f"{name}.json", record)


def fmt_table(header: list, rows: list) -> str:
    "A plain right-aligned text table."
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c:.4g}" if isinstance(c, float) else str(c)
                                           for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w[i]) for i, c in enumerate(r)) for r in cells)


def load_before(ref: str = "main", module: str = "", name: str = "tbps_clip_before"):
    "Module `module` of the tbps_clip package as of git `ref`, imported beside this one as `name` (before/after in one process)."
    import importlib
    import subprocess
    import tarfile
    import tempfile
    if name in sys.modules: return importlib.import_module(f"{name}.{module}" if module else name)
    tmp = Path(tempfile.mkdtemp(prefix="tbps-before-"))
    data = subprocess.run(["git", "archive", ref, "tbps_clip"], cwd=ROOT, capture_output=True, check=True).stdout
    import io
    with tarfile.open(fileobj=io.BytesIO(data)) as tf: tf.extractall(tmp, filter="data")
    (tmp / "tbps_clip").rename(tmp / name)  # the package imports itself relatively, so a new name works
    sys.path.insert(0, str(tmp))
    mod = importlib.import_module(name)
    mod.git_ref = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip()
    return importlib.import_module(f"{name}.{module}") if module else mod
