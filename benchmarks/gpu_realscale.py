"""Real-scale check of the CUDA training path: the library's own `train` (data loader with workers and pinned
memory, autocast, fused AdamW, the preset's losses) for a few hundred steps of ViT-B/16 with random weights at
224x224 on SynthPEDES (synthetic), with throughput, data-loading wait and peak GPU memory.

    python benchmarks/gpu_realscale.py --preset clip --steps 300 --batch 64 --workers 8 [--set key=value ...]

Prints one JSON line (also appended to --out): samples/s over the steps after --skip warm-up steps, the share of
each step spent waiting for the loader, peak allocated/reserved GiB, final loss and test R@1 (meaningless for
so short a run; it shows the evaluation path ran)."""
import argparse
import json
import sys
import tempfile
import time

import torch


def sync():
    if torch.cuda.is_available(): torch.cuda.synchronize()


class StepMeter:
    "Training callback: wall time per step and the part of it spent waiting for the next batch (device-synchronised)."
    def __init__(self):
        self.starts, self.ends = [], []

    def before_batch(self, tr):
        sync()
        self.starts.append(time.perf_counter())

    def after_batch(self, tr):
        sync()
        self.ends.append(time.perf_counter())

    def summary(self, skip: int, batch: int) -> dict:
        "Median step interval after `skip` steps (robust to checkpoint saves), samples/s, and the loader's share."
        import statistics
        ends, starts = self.ends[skip:], self.starts[skip + 1:]
        step = statistics.median(b - a for a, b in zip(ends, ends[1:]))
        compute = statistics.median(e - s for s, e in zip(starts, ends[1:]))
        wall = ends[-1] - ends[0]
        return dict(timed_steps=len(ends) - 1, s_per_step=round(step, 4), samples_per_s=round(batch / step, 1),
                    samples_per_s_incl_saves=round(batch * (len(ends) - 1) / wall, 1),
                    loader_wait_share=round(max(0.0, 1 - compute / step), 3))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="clip")
    ap.add_argument("--arch", default="ViT-B-16")
    ap.add_argument("--size", type=int, nargs=2, default=(224, 224))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--skip", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--out", default="")
    ap.add_argument("--device", default="cuda", help="cuda (the check); cpu only to try the script")
    a = ap.parse_args()
    assert a.device == "cpu" or torch.cuda.is_available(), "no CUDA device"
    cuda = a.device != "cpu"
    from tbps_clip.config import make_config, parse_overrides
    from tbps_clip.run import train
    meter = StepMeter()
    with tempfile.TemporaryDirectory() as tmp:
        over = {"model.arch": a.arch, "model.pretrained": "none", "model.quick_gelu": True,
                "data.image_size": list(a.size), "data.batch_size": a.batch, "data.num_workers": a.workers,
                "train.max_steps": a.steps, "train.device": a.device, "train.precision": a.precision,
                "train.eval_every": 0, "out_dir": tmp, **parse_overrides(a.set)}
        cfg = make_config(a.preset, over)
        if cuda: torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rec = train(cfg, progress=False, callbacks=[meter])
        total = time.perf_counter() - t0
    gib = lambda f: round(f() / 2**30, 2) if cuda else None
    row = dict(device=torch.cuda.get_device_name(0) if cuda else "cpu", torch=torch.__version__, preset=a.preset, arch=a.arch,
               image_size=list(a.size), batch=a.batch, workers=a.workers, precision=a.precision, steps=a.steps,
               overrides=a.set, **meter.summary(a.skip, a.batch),
               peak_alloc_gib=gib(torch.cuda.max_memory_allocated), peak_reserved_gib=gib(torch.cuda.max_memory_reserved),
               total_s=round(total, 1), test_R1=round(rec["metrics"]["R@1"], 2), synthetic=True)
    print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "a") as f: f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
