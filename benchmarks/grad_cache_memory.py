"""Peak memory of one training step with and without gradient caching (train.grad_cache_chunk), on the CPU.

Each setting runs in a fresh process: build the model and a random batch, record the resident set size (RSS),
run one training step while a thread samples the RSS every millisecond, and report the peak increase over
the pre-step RSS (the step's activations, gradients and optimizer state). The first step of a fresh process
is measured, so memory the allocator kept from earlier steps cannot hide anything. Also reports the step
time and checks that the gradients equal those of the full batch.

    python benchmarks/grad_cache_memory.py --batch 256 --chunks 0 64 32 --preset tbps
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    "Current resident set size of this process, MiB (Linux)."
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    from tbps_clip.config import make_config
    from tbps_clip.heads import attach_heads
    from tbps_clip.run import prepare_model
    from tbps_clip.text import tokenize
    from tbps_clip.train import SoftLabels, Trainer
    cfg = make_config(a.preset, {"model.arch": a.arch, "model.pretrained": "none", "data.batch_size": a.batch,
                                 "train.device": "cpu", "train.precision": "fp32", "trick.text_dropout": 0.0,
                                 "train.grad_cache_chunk": a.chunk})
    torch.manual_seed(0)
    model = attach_heads(prepare_model(cfg), cfg, 100)
    h, w = model.image_size
    g = torch.Generator().manual_seed(0)
    words = "man woman red blue black white shirt pants bag backpack shoes hat jacket skirt long short hair".split()
    caps = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=g)) for _ in range(a.batch)]
    batch = dict(text=tokenize(caps, model.context_length), pid=torch.randint(a.batch // 2, (a.batch,), generator=g),
                 index=torch.arange(a.batch))
    for k in ("image", "image_aug", "ss_image_a", "ss_image_b"):
        if k == "image" or (k == "image_aug" and cfg.loss.mvs_i) or (k.startswith("ss_") and cfg.loss.ss_i):
            batch[k] = torch.randn(a.batch, 3, h, w, generator=g)
    cbs = [SoftLabels(cfg.trick.soft_label)] if cfg.trick.soft_label else []
    tr = Trainer(cfg, model, list(range(a.batch * 4)), progress=False, callbacks=cbs)
    tr.step = tr.steps_per_epoch  # soft labels at full alpha
    base, peak, done = rss_mib(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    logs = tr.train_step(batch)
    sec = time.perf_counter() - t0
    done.set(); th.join()
    peak[0] = max(peak[0], rss_mib())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if a.save_grads: torch.save(grads, a.save_grads)
    return dict(chunk=a.chunk, batch=a.batch, preset=a.preset, arch=a.arch, rss_before_mib=round(base, 1),
                peak_increase_mib=round(peak[0] - base, 1), step_seconds=round(sec, 2), loss=logs["loss"])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 32], help="0 = no gradient caching")
    p.add_argument("--preset", default="tbps")
    p.add_argument("--arch", default="tbps-tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--save-grads", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    import platform
    import tempfile
    import torch
    rows, grads = [], {}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        for c in a.chunks:
            gp = f"{tmp}/g{c}.pt"
            cmd = [sys.executable, __file__, "--child", "--chunk", str(c), "--batch", str(a.batch), "--preset", a.preset,
                   "--arch", a.arch, "--threads", str(a.threads), "--save-grads", gp]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0: sys.exit(r.stderr[-3000:])
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            grads[c] = torch.load(gp)
        ref = grads[a.chunks[0]]
        for row, c in zip(rows, a.chunks):
            row["max_rel_grad_diff_vs_first"] = max(float((grads[c][n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-12))
                                                    for n in ref)
    print(f"one training step, preset {a.preset}, {a.arch}, batch {a.batch}, fp32, CPU ({platform.processor() or platform.machine()}, "
          f"{a.threads} threads)")
    print(f"{'chunk':>8} {'peak RSS increase (MiB)':>24} {'step (s)':>9} {'max rel. grad diff':>19}")
    for r in rows:
        print(f"{r['chunk'] or 'full':>8} {r['peak_increase_mib']:>24.1f} {r['step_seconds']:>9.2f} {r['max_rel_grad_diff_vs_first']:>19.2e}")
    if a.out:
        from tbps_clip.core import atomic_write_json  # a killed run leaves the old record whole
        atomic_write_json(a.out, dict(rows=rows, machine=platform.machine(), cpu_count=os.cpu_count(), torch=torch.__version__))


if __name__ == "__main__":
    main()
