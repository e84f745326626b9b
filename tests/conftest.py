"""Shared fixtures: an isolated cache, offline hubs, and the toy dataset of `tbps_clip.fixtures`."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait for a hub: there is no internet in CI
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

from tbps_clip.fixtures import make_toy_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    "Every test gets the session's private cache folder, never the user's."
    monkeypatch.setenv("TBPS_CLIP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


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
