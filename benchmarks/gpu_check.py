"""A short check of the CUDA paths on a GPU machine: AMP training end to end on a tiny SynthPEDES, and
training-step throughput and peak memory of ViT-B/16 (random weights) at 384x128 under bf16 autocast.
Prints figures; asserts only that the paths run and produce finite numbers."""
import argparse
import json
import os
import sys
import tempfile
import time

import torch


def vit_b16_step(batch: int, steps: int, image_size=(384, 128), precision="bf16") -> dict:
    "Samples/s and peak memory of fwd+bwd+AdamW for ViT-B/16 with random weights on CUDA."
    from tbps_clip.core import autocast
    from tbps_clip.losses import itc
    from tbps_clip.model import create_model
    from tbps_clip.train import make_optimizer
    from tbps_clip.config import OptimConfig
    dev = torch.device("cuda")
    m = create_model("ViT-B-16", image_size=image_size, quick_gelu=True).to(dev)
    opt = make_optimizer(m, OptimConfig())
    x = torch.randn(batch, 3, *image_size, device=dev)
    t = torch.randint(1, 49407, (batch, 77), device=dev)
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize(); t0 = time.perf_counter()
        with autocast(dev, precision):
            out = m(x, t)
            loss = itc(out["image_feats"], out["text_feats"], out["logit_scale"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return dict(batch=batch, image_size=list(image_size), precision=precision, s_per_step=round(dt, 4),
                samples_per_s=round(batch / dt, 1), peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                loss=float(loss), params_m=round(sum(p.numel() for p in m.parameters()) / 1e6, 2))


def amp_end_to_end(tmp: str) -> dict:
    "Generate a tiny SynthPEDES, pretrain tbps-micro briefly and fine-tune it under AMP on CUDA."
    os.environ["TBPS_CLIP_CACHE"] = os.path.join(tmp, "cache")
    from tbps_clip.config import make_config
    from tbps_clip.run import train
    from tbps_clip.synthpedes import make_synthpedes
    root = os.path.join(tmp, "synth")
    make_synthpedes(root, n_train_ids=60, n_val_ids=10, n_test_ids=30, progress=False)
    res = {}
    for prec in ("amp", "fp32"):
        cfg = make_config("clip", {"data.dataset": "synthpedes", "data.root": root, "model.pretrained": "none",
                                   "data.batch_size": 32, "train.epochs": 3, "train.device": "cuda",
                                   "train.precision": prec, "out_dir": os.path.join(tmp, f"run-{prec}")})
        t0 = time.perf_counter()
        rec = train(cfg, progress=False)
        res[prec] = dict(seconds=round(time.perf_counter() - t0, 1), **{k: round(rec["metrics"][k], 2) for k in ("R@1", "mAP")})
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    out = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    with tempfile.TemporaryDirectory() as tmp:
        out["amp_end_to_end"] = amp_end_to_end(tmp)
    out["vit_b16_384x128_bf16"] = vit_b16_step(a.batch, a.steps)
    out["vit_b16_224x224_bf16"] = vit_b16_step(a.batch, a.steps, (224, 224))
    print(json.dumps(out, indent=1))
    sys.exit(0)
