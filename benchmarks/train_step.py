"""Training-step benchmark: the Trainer's step for each preset next to a minimal open_clip reference loop.

    python benchmarks/train_step.py [--cases tiny vitb224 vitb384] [--presets clip simplified tbps] [--threads 1]
                                    [--batch N] [--steps N] [--before main] [--workers 2] [--name train_step]

For each case (architecture, input size, batch) and preset, in one process (same machine load):
- trainer: `Trainer.train_step` on batches the preset's dataset produced (SynthPEDES, pre-collated, so no data
  loading), with the preset's losses, heads, extra views and soft labels (both `trick.soft_label_source`s
  where the preset has soft labels);
- before: the same with the Trainer of git ref --before (default main: the code the change is measured against), same model init;
- reference (once per case): a plain open_clip model of the same architecture, the same image/caption batch,
  symmetric ITC, AdamW with torch's default implementation, zero_grad/backward/step and nothing else.
Each variant runs one warm-up step (counted with torch.utils.flop_counter: matmul/conv/attention FLOPs of
forward + backward) and then --steps timed steps. Printed per variant: seconds per step, samples/s, peak memory
(CPU: RSS high-water mark above the pre-step RSS; CUDA: max_memory_allocated), GFLOP per step, achieved
fraction of the machine's GEMM peak (benchmarks/cpu_peak.py), the encoder passes per step (image/text, with
gradient + no-grad), the step-time ratio to the reference and the ratio per FLOP (time per FLOP relative to
the reference: 1.0 = the recipe's extra passes cost exactly their FLOPs).
Data loading (per case, clip and tbps): seconds per batch of the preset's DataLoader with 0 workers and with
--workers workers, its share of a step (load / (load + step)), and, with workers, the part of the loading a
real loop leaves exposed ((loop time - steps) / loop time).
Results: benchmarks/results/<name>.json and .txt with the machine, threads and load average.
"""
import argparse
import copy
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import PeakMemory, fmt_table, load_average, load_before, machine, write_results  # noqa: E402
from cpu_peak import gemm_peak  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

CASES = {  # name -> (arch, (h, w), CPU batch, CPU steps, CUDA batch, CUDA steps)
    "tiny": ("tbps-tiny", (128, 64), 32, 5, 256, 20),
    "vitb224": ("ViT-B-16", (224, 224), 2, 2, 64, 10),
    "vitb384": ("ViT-B-16", (384, 128), 2, 2, 64, 10),
}


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


def run_steps(step, batches, device, warm=1, count_flops=True):
    "(median seconds per timed step, FLOPs of one step, peak MiB, extra MiB): warm-up under the FLOP counter, then timed."
    import contextlib
    import statistics
    with PeakMemory(device.type) as pm:
        # under torch.compile the warm-up step compiles; the FLOP counter is left out there (NaN)
        with (FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()) as fc:
            step(batches[0])
        sync(device)
        for b in batches[1:warm]: step(b)
        times = []
        for b in batches[warm:]:  # each step timed alone: the median resists the shared machine's bursts
            sync(device)
            t = time.perf_counter()
            step(b)
            sync(device)
            times.append(time.perf_counter() - t)
    return statistics.median(times), fc.get_total_flops() if count_flops else float("nan"), pm.peak, pm.extra


def adamw_update_s(model, fused, device, repeat=3) -> float:
    "Best seconds of one AdamW update of `model`'s parameters on random gradients (per-tensor loop or fused)."
    ps = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in ps]
    for p in ps: p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(ps, lr=1e-4, fused=True if fused else None)
    opt.step()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        opt.step()
        sync(device)
        best = min(best, time.perf_counter() - t)
    with torch.no_grad():
        for p, s in zip(ps, saved): p.copy_(s); p.grad = None
    return best


def reference_step_fn(arch, image_size, ctx, device, precision):
    "A plain open_clip model and its ITC + AdamW step (the comparison loop)."
    import open_clip
    from tbps_clip.core import autocast
    from tbps_clip.model import register_archs
    register_archs()
    torch.manual_seed(0)
    clip = open_clip.create_model(arch, pretrained=None, force_image_size=image_size, force_context_length=ctx).to(device)
    clip.train()
    # torch's default AdamW implementation, as a plain loop would have it (per-tensor on the CPU, foreach on CUDA)
    opt = torch.optim.AdamW(clip.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.02)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")

    def step(batch):
        x, t = batch["image"].to(device, non_blocking=True), batch["text"].to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            i = F.normalize(clip.encode_image(x), dim=-1)
            s = F.normalize(clip.encode_text(t), dim=-1)
            logits = clip.logit_scale.exp().clamp(max=100) * i @ s.t()
            labels = torch.arange(len(x), device=device)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    return step, clip


def passes(cfg, batch, source) -> str:
    "Encoder passes per step: image/text with gradient, + no-grad passes of the soft labels."
    ig = 1 + ("image_aug" in batch) + 2 * ("ss_image_a" in batch)
    tg = 1 + ("text_aug" in batch) + 2 * ("ss_text_a" in batch)
    ng = cfg.trick.soft_label > 0 and source == "nograd"
    i_ng = (1 + ("image_aug" in batch)) if ng else 0
    t_ng = (1 + ("text_aug" in batch)) if ng else 0
    return f"I {ig}+{i_ng}ng T {tg}+{t_ng}ng"


def build(preset, arch, image_size, batch_size, device, precision, overrides=()):
    "Config, dataset and a function making a fresh model (same init every call) for one preset."
    from tbps_clip.config import make_config
    from tbps_clip.core import seed_everything
    from tbps_clip.heads import attach_heads
    from tbps_clip.run import load_data, prepare_model, train_dataset
    ov = {"model.arch": arch, "model.pretrained": "none", "data.image_size": list(image_size),
          "data.batch_size": batch_size, "train.device": str(device), "train.precision": precision,
          "train.max_steps": 1000, "train.seed": 0, **dict(overrides)}
    cfg = make_config(preset, ov)
    ann = load_data(cfg)

    def fresh_model():
        seed_everything(0)
        m = prepare_model(cfg)
        return attach_heads(m, cfg, ds.num_classes)
    seed_everything(0)
    from tbps_clip.model import arch_config
    ctx = arch_config(arch)["text_cfg"].get("context_length", 77)
    ds = train_dataset(cfg, ann, image_size, ctx)
    return cfg, ds, fresh_model


def trainer_step_fn(trainer_mod, cfg, model, ds, source):
    "A Trainer of module `trainer_mod` (this tree's or --before's) and its step function."
    from tbps_clip.distributed import make_gather
    c = copy.deepcopy(cfg)
    c.trick.soft_label_source = source
    cbs = [trainer_mod.SoftLabels(c.trick.soft_label, c.trick.soft_label_warmup, source)] if c.trick.soft_label else []
    tr = trainer_mod.Trainer(c, model, ds, callbacks=cbs, progress=False, gather=make_gather(c.trick.global_grad),
                             out_dir="/tmp/tbps-bench-unused")
    tr.step = tr.steps_per_epoch  # past the soft-label warm-up: alpha at its final value, as in most of a run
    tr.model.train()

    def step(batch):
        tr.train_step(batch)
        tr.step += 1
    return step, tr


def loader_times(tr, n, workers, step_s):
    "Seconds per batch of the trainer's DataLoader (after the first), the first batch's wait, and the exposed share."
    tr.cfg.data.num_workers = workers
    it = iter(tr.loader(0, 0))
    t = time.perf_counter()
    next(it)
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n): next(it)
    per = (time.perf_counter() - t) / n
    del it
    return first, per


def exposed_loading(tr, step_fn, n, workers, step_s, device):
    "Share of a loop (loader with `workers` + n steps) spent waiting for data: (loop - n * step) / loop."
    tr.cfg.data.num_workers = workers
    it = iter(tr.loader(0, 0))
    next(it)  # worker start-up is a once-per-epoch cost, left out
    t = time.perf_counter()
    for _ in range(n): step_fn(next(it))
    sync(device)
    loop = time.perf_counter() - t
    del it
    return max(loop - n * step_s, 0.0) / loop


def run_pending(pending, device, rows, rec, a, case):
    "Sequential mode: time every pending variant not yet timed, one after the other, and drop its model."
    for v in pending:
        if "done" in v: continue
        t, f, pk, x = run_steps(v["step"], v["batches"], device, count_flops=v["flops"])
        v["row"].update(step_s=t, flops=f, peak_mib=pk, extra_mib=x, load=load_average())
        rows.append(v["row"])
        print(f"  {case} {v['row']['preset']} {v['row']['variant']}: {t:.3f} s/step", flush=True)
        if v.get("loader"): loader_record(v, rows, rec, a, case, device)
        v["done"] = v["loader_done"] = True
        if not v.get("loader"): v["keep"] = v["step"] = None
        gc.collect()
        if device.type == "cuda": torch.cuda.empty_cache()


def run_interleaved(pending, device, rows, a):
    "Interleaved mode: warm every variant up (FLOPs, memory), then time step i of every variant in turn."
    import statistics
    for v in pending:
        with PeakMemory(device.type) as pm:
            with FlopCounterMode(display=False) as fc:
                v["step"](v["batches"][0])
            sync(device)
        v["row"].update(flops=fc.get_total_flops(), peak_mib=pm.peak, extra_mib=pm.extra, times=[])
    for i in range(1, len(pending[0]["batches"])):
        for v in pending:  # every variant's step i under the same load
            sync(device)
            t = time.perf_counter()
            v["step"](v["batches"][i])
            sync(device)
            v["row"]["times"].append(time.perf_counter() - t)
    for v in pending:
        v["row"].update(step_s=statistics.median(v["row"]["times"]), load=load_average())
        rows.append(v["row"])


def loader_record(v, rows, rec, a, case, device):
    "Loader timings of a variant's trainer (0 and --workers workers; exposed share for --exposed-cases)."
    if v.get("loader_done"): return
    tr, t = v["keep"], v["row"]["step_s"]
    first0, per0 = loader_times(tr, a.loader_batches, 0, t)
    ld = dict(case=case, preset=v["row"]["preset"], step_s=t, w0_batch_s=per0, w0_share=per0 / (per0 + t))
    if a.workers:
        first_w, per_w = loader_times(tr, a.loader_batches, a.workers, t)
        ld.update(workers=a.workers, wN_first_s=first_w, wN_batch_s=per_w)
        if case in a.exposed_cases:
            ld["wN_exposed"] = exposed_loading(tr, v["step"], a.loader_batches, a.workers, t, device)
    ld["load"] = load_average()
    rec["loading"].append(ld)
    v["loader_done"] = True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--presets", nargs="+", default=["clip", "simplified", "tbps"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="amp")
    ap.add_argument("--batch", type=int, default=0, help="override every case's batch size")
    ap.add_argument("--steps", type=int, default=0, help="override every case's timed steps")
    ap.add_argument("--before", default="main", help="git ref whose Trainer is also timed ('' = skip)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--loader-presets", nargs="*", default=["clip", "tbps"])
    ap.add_argument("--loader-batches", type=int, default=4)
    ap.add_argument("--exposed-cases", nargs="*", default=["tiny"], help="cases whose loader+steps loop is also run")
    ap.add_argument("--no-detached", action="store_true", help="skip the soft_label_source=detached variant")
    ap.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value for the trainer variants")
    ap.add_argument("--interleave", action="store_true",
                    help="hold every variant of a case in memory and time their steps in turn (same load; CPU, small models)")
    ap.add_argument("--name", default="train_step")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import tbps_clip.train as now
    from tbps_clip.config import parse_overrides
    from tbps_clip.core import resolve_device
    device = resolve_device(a.device)
    if device.type != "cuda": print("no CUDA: CPU cases only (GPU figures need a CUDA machine)")
    before = load_before(a.before, "train") if a.before else None
    peak = gemm_peak(4096 if device.type == "cpu" else 8192, 3, str(device),
                     torch.float32 if device.type == "cpu" else torch.bfloat16)
    rec = dict(machine=machine(), args=vars(a), device=str(device), gemm_peak_flops=peak, rows=[], loading=[])
    head = (f"machine: {rec['machine']['cpu']}, {rec['machine']['cpus']} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), device {device}"
            + (f" ({rec['machine']['cuda_device']})" if device.type == "cuda" else "")
            + f"; GEMM peak {peak / 1e9:.1f} GFLOP/s; load average at start {load_average()}")
    print(head, flush=True)
    lines = [head]
    extra = parse_overrides(a.set)
    for case in a.cases:
        arch, size, cb, cs, gb, gs = CASES[case]
        bs = a.batch or (gb if device.type == "cuda" else cb)
        steps = a.steps or (gs if device.type == "cuda" else cs)
        rows, ref_t, pending = [], None, []
        for preset in a.presets:
            cfg, ds, fresh_model = build(preset, arch, size, bs, device, a.precision, extra)
            # the same pre-collated batches for every variant: item seeds depend on (seed, epoch, index) only
            from tbps_clip.data import collate
            batches = [collate([ds[j] for j in range(i * bs, (i + 1) * bs)]) for i in range(1 + steps)]
            if ref_t is None:
                ref_step, ref_model = reference_step_fn(arch, size, cfg.model.context_length or batches[0]["text"].shape[1],
                                                        device, a.precision)
                upd = dict(case=case, per_tensor_s=adamw_update_s(ref_model, False, device),
                           fused_s=adamw_update_s(ref_model, True, device), load=load_average())
                rec.setdefault("adamw_update", []).append(upd)
                print(f"  {case} AdamW update of the towers: per-tensor loop {upd['per_tensor_s']:.3f} s, "
                      f"fused {upd['fused_s']:.3f} s", flush=True)
                ref_t = 0.0
                pending.append(dict(row=dict(case=case, preset="reference", variant="open_clip ITC",
                                             passes="I 1+0ng T 1+0ng"), step=ref_step, batches=batches, keep=ref_model,
                                    flops=True))
            sources = ["nograd"] + (["detached"] if cfg.trick.soft_label and not a.no_detached else [])
            variants = [("now", now, s) for s in sources] + ([("before", before, "nograd")] if before else [])
            for tag, mod, src in variants:
                step, tr = trainer_step_fn(mod, cfg, fresh_model(), ds, src)
                name = tag if not cfg.trick.soft_label else f"{tag} ({src})"
                pending.append(dict(row=dict(case=case, preset=preset, variant=name, passes=passes(cfg, batches[0], src)),
                                    step=step, batches=batches, keep=tr, flops=cfg.train.compile == "off",
                                    loader=tag == "now" and src == "nograd" and preset in a.loader_presets))
                if not a.interleave: run_pending(pending, device, rows, rec, a, case)
        if a.interleave: run_interleaved(pending, device, rows, a)
        for v in pending:  # loader timings (interleaved mode: after all steps)
            if v.get("loader"): loader_record(v, rows, rec, a, case, device)
        pending.clear(); gc.collect()
        ref_row = next(r for r in rows if r["preset"] == "reference")
        ref_t, ref_f = ref_row["step_s"], ref_row["flops"]
        for r in rows:
            r.update(arch=arch, image_size=list(size), batch=bs, steps=steps, samples_s=bs / r["step_s"],
                     gflop=r["flops"] / 1e9, peak_frac=r["flops"] / r["step_s"] / peak,
                     ratio=r["step_s"] / ref_t, ratio_per_flop=(r["step_s"] / ref_t) / (r["flops"] / ref_f))
        rec["rows"] += rows
        tab = fmt_table(["preset", "variant", "s/step", "samples/s", "peak MiB", "+MiB", "GFLOP/step", "% peak",
                         "passes", "x ref", "x ref/FLOP", "load"],
                        [[r["preset"], r["variant"], f"{r['step_s']:.3f}", f"{r['samples_s']:.1f}", f"{r['peak_mib']:.0f}",
                          f"{r['extra_mib']:.0f}", f"{r['gflop']:.1f}", f"{100 * r['peak_frac']:.0f}", r["passes"],
                          f"{r['ratio']:.2f}", f"{r['ratio_per_flop']:.2f}", str(r["load"][0])] for r in rows])
        upd = rec["adamw_update"][-1]
        block = [f"\n{case}: {arch} at {size[0]}x{size[1]}, batch {bs}, median of {steps} timed steps after 1 warm-up, "
                 f"precision {a.precision if device.type == 'cuda' else 'fp32'}; one AdamW update of the towers: "
                 f"per-tensor loop {upd['per_tensor_s']:.3f} s, fused {upd['fused_s']:.3f} s", tab]
        print("\n".join(block), flush=True)
        lines += block
        write_results(a.name, rec, "\n".join(lines))  # after each case: a long run's finished cases are kept
    if rec["loading"]:
        tab = fmt_table(["case", "preset", "step s", "load s/batch (0 w)", "share (0 w)", f"first batch s ({a.workers} w)",
                         f"s/batch ({a.workers} w)", f"exposed ({a.workers} w)", "load"],
                        [[d["case"], d["preset"], f"{d['step_s']:.3f}", f"{d['w0_batch_s']:.3f}", f"{100 * d['w0_share']:.0f}%",
                          f"{d.get('wN_first_s', float('nan')):.2f}", f"{d.get('wN_batch_s', float('nan')):.3f}",
                          f"{100 * d.get('wN_exposed', float('nan')):.0f}%", str(d["load"][0])] for d in rec["loading"]])
        block = ["\ndata loading (SynthPEDES, the preset's transforms and views)", tab]
        print("\n".join(block), flush=True)
        lines += block
    rec["machine"]["load_average_end"] = load_average()
    print(f"\nwrote {write_results(a.name, rec, chr(10).join(lines))}")
    return rec


if __name__ == "__main__":
    main()
