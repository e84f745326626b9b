"""Shared fixtures: an isolated cache, offline hubs, and a tiny toy dataset built with PIL."""
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for a hub: there is no internet in CI
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

COLOURS = {"red": (200, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 200), "yellow": (220, 210, 40),
           "black": (20, 20, 20), "white": (235, 235, 235), "purple": (130, 40, 160), "orange": (240, 140, 20)}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    "Every test gets the session's private cache folder, never the user's."
    monkeypatch.setenv("TBPS_CLIP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def make_toy_dataset(root, n_ids=(8, 2, 4), images_per_id=3, size=(32, 16), seed=0):
    "A toy dataset: each identity is a (top, bottom) colour pair; captions name the colours."
    from PIL import Image
    from tbps_clip.records import Record, write_annotations
    rng = random.Random(seed)
    names = list(COLOURS)
    records, pid = [], 0
    for split, n in zip(("train", "val", "test"), n_ids):
        for _ in range(n):
            top, bottom = rng.sample(names, 2)
            for k in range(images_per_id):
                im = Image.new("RGB", (size[1], size[0]), tuple(rng.randrange(256) for _ in range(3)))
                h = size[0]
                for y0, y1, c in ((h // 8, h // 2, top), (h // 2, h - h // 8, bottom)):
                    col = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[c])
                    x0 = rng.randint(0, size[1] // 4)
                    im.paste(col, (x0, y0, x0 + size[1] // 2, y1))
                rel = f"images/{split}/{pid}_{k}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                im.save(root / rel)
                caps = [f"a person in a {top} top and {bottom} trousers", f"{bottom} pants with a {top} shirt"]
                records.append(Record(rel, pid, caps, split, [f"someone wearing {top} and {bottom}"] * 2))
            pid += 1
    return write_annotations(root / "annotations.json", records, root, dataset="toy")


@pytest.fixture
def toy(tmp_path):
    "Path of a freshly written toy annotation file."
    return make_toy_dataset(tmp_path / "toy")


def micro_overrides(ann_path, out_dir, **extra):
    "Overrides for a seconds-long run of the micro architecture on a toy dataset."
    d = {"model.arch": "tbps-micro", "model.pretrained": "none", "data.dataset": "annotations",
         "data.annotations": str(ann_path), "data.image_size": "[32,16]", "data.batch_size": 8,
         "train.epochs": 2, "train.log_every": 1, "out_dir": str(out_dir), "optim.lr": 1e-3}
    d.update(extra)
    return d
