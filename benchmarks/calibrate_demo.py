"""How the demo's budget was chosen: pretrain the small CLIP at several learning rates and lengths, then
fine-tune each with the `clip` preset, and print zero-shot and fine-tuned R@1 / mAP on SynthPEDES test
(synthetic). Meant for a machine with many cores or a GPU; results are synthetic and machine-dependent."""
import argparse
import json
import os
import time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="runs/calibrate")
ap.add_argument("--device", default="auto")
ap.add_argument("--workers", type=int, default=8)
ap.add_argument("--pretrain", default="5e-4:450,1e-3:450,1e-3:900,2e-3:900", help="lr:steps,...")
ap.add_argument("--finetune-lr", default="1e-4,3e-4")
ap.add_argument("--epochs", type=int, default=5)
ap.add_argument("--max-steps", type=int, default=0, help="cap fine-tuning steps (smoke test of this script)")
a = ap.parse_args()
out = Path(a.out)
os.environ.setdefault("TBPS_CLIP_CACHE", str(out / "cache"))

from tbps_clip.config import make_config  # noqa: E402
from tbps_clip.pretrain import pretrain_synthclip  # noqa: E402
from tbps_clip.run import train  # noqa: E402
from tbps_clip.synthpedes import ensure_synthpedes  # noqa: E402

root = ensure_synthpedes()
rows = []
for spec in ["none"] + a.pretrain.split(","):
    if spec == "none":
        ckpt, lr_p, steps = "none", None, 0
    else:
        lr_p, steps = float(spec.split(":")[0]), int(spec.split(":")[1])
        ckpt = out / f"synthclip-{lr_p:g}-{steps}.pt"
        t0 = time.perf_counter()
        if not ckpt.exists():
            pretrain_synthclip("tbps-tiny", steps=steps, lr=lr_p, out=ckpt, progress=False, device=a.device,
                               num_workers=a.workers)
        pt_s = time.perf_counter() - t0
    for lr_f in [float(x) for x in a.finetune_lr.split(",")]:
        t0 = time.perf_counter()
        cfg = make_config("clip", {"model.pretrained": str(ckpt), "optim.lr": lr_f, "train.epochs": a.epochs,
                                   "train.device": a.device, "train.precision": "fp32",
                                   "train.max_steps": a.max_steps, "data.num_workers": a.workers,
                                   "out_dir": str(out / f"ft-{spec.replace(':', '_')}-{lr_f:g}")})
        rec = train(cfg, progress=False, zero_shot=ckpt != "none")
        row = dict(pretrain=spec, finetune_lr=lr_f, steps=rec["steps"], seconds=round(time.perf_counter() - t0, 1),
                   zs_R1=round(rec["zero_shot"]["R@1"], 2) if rec["zero_shot"] else None,
                   R1=round(rec["metrics"]["R@1"], 2), mAP=round(rec["metrics"]["mAP"], 2),
                   val=[round(e["R@1"], 1) for e in rec["val_history"]])
        rows.append(row)
        print(json.dumps(row), flush=True)
print("SynthPEDES (synthetic) calibration:", json.dumps(rows, indent=1))
