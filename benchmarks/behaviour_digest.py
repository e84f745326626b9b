"""Behaviour digest: figures that a refactoring must leave unchanged, bit for bit.

    python benchmarks/behaviour_digest.py [--out FILE.json]

Prints (and with --out writes) for the commit checked out:
1. SynthPEDES: sha256 of a small generated dataset (its annotation file and every image's bytes);
2. tiny runs: for the presets `clip`, `simplified` and `tbps`, the micro architecture trained 6 steps on a small
   SynthPEDES from random weights, every logged loss term (repr, so bit-exact) and the sha256 of the final weights;
3. the shipped small CLIP: one `tbps` run of 4 steps from `model.pretrained=synthclip` on the same data, its losses,
   final-weights digest and test R@1.
Two commits behave the same when their digests are equal; compare with `diff` on the JSON files.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sha256_tree(folder: Path) -> str:
    "sha256 over every file under `folder` (sorted relative paths and bytes)."
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.name != ".lock"):
        h.update(str(p.relative_to(folder)).encode()); h.update(p.read_bytes())
    return h.hexdigest()


def sha256_state(sd: dict) -> str:
    "sha256 over a state dict's names and tensor bytes."
    import torch
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k]
        h.update(k.encode())
        if isinstance(v, torch.Tensor): h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def losses(out: Path) -> list:
    "Every loss value the run logged (repr of floats, so equal strings mean equal bits)."
    return [f"{d['step']}:{k}={d[k]!r}" for d in json.loads((out / "history.json").read_text())["train"]
            for k in sorted(d) if k not in ("step", "epoch", "lr")]


def untimed(d: dict) -> dict:
    "A metrics dict without its timings (keys ending in `_s`), values as repr."
    return {k: repr(v) for k, v in sorted(d.items()) if not k.endswith("_s")}


def tiny_run(preset: str, data: Path, out: Path, extra: dict) -> dict:
    "Train `preset` briefly and return its losses, final-weights digest, test metrics and fit."
    from tbps_clip.weights import read_checkpoint_file
    from tbps_clip.config import make_config
    from tbps_clip.run import train
    ov = {"data.dataset": "synthpedes", "data.root": str(data), "data.batch_size": 8, "train.max_steps": 6,
          "train.log_every": 1, "train.device": "cpu", "out_dir": str(out), "train.seed": 0, **extra}
    rec = train(make_config(preset, ov), progress=False)
    return dict(losses=losses(out), weights=sha256_state(read_checkpoint_file(out / "checkpoint.pt")["model"]),
                metrics=untimed(rec["metrics"]), fit=untimed(rec["fit"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the digest to this JSON file")
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    from tbps_clip.synthpedes import make_synthpedes
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["TBPS_CLIP_CACHE"] = str(tmp / "cache")
        data = make_synthpedes(tmp / "synth", n_train_ids=24, n_val_ids=6, n_test_ids=8, image_size=(64, 32), progress=False)
        res["synthpedes"] = sha256_tree(data)
        micro = {"model.arch": "tbps-micro", "model.pretrained": "none", "data.image_size": "[32,16]", "optim.lr": 1e-3}
        for preset in ("clip", "simplified", "tbps"):
            res[f"micro/{preset}"] = tiny_run(preset, data, tmp / preset, micro)
        res["synthclip/tbps"] = tiny_run("tbps", data, tmp / "synthclip", {"train.max_steps": 4})
    txt = json.dumps(res, indent=1)
    print(txt)
    if a.out: Path(a.out).write_text(txt + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
