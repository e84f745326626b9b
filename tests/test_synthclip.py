"""The small pretrained CLIP shipped with the package: it is what `synthclip` loads, its file matches its card,
and it reproduces the card's zero-shot metrics on the SynthPEDES splits (synthetic)."""
import json

import pytest

from tbps_clip.checkpoint import shipped_synthclip, synthclip_source
from tbps_clip.config import make_config
from tbps_clip.model import create_model
from tbps_clip.pretrain import sha256, zero_shot_evaluator
from tbps_clip.weights import load_weights, read_checkpoint_file

ARCH = make_config("clip").model.arch


def card():
    p = shipped_synthclip(ARCH)
    assert p is not None, f"no shipped small CLIP for the default architecture {ARCH}"
    return p, json.loads(p.with_suffix(".json").read_text())


def test_default_architecture_ships_its_weights_and_synthclip_loads_them():
    p, c = card()
    assert synthclip_source(ARCH) == p
    assert c["arch"] == ARCH and c["synthetic"] is True
    assert p.stat().st_size == c["bytes"] <= 25 * 2**20
    assert sha256(p) == c["sha256"]
    obj = read_checkpoint_file(p)  # safetensors: read without unpickling anything
    assert obj["identity"]["arch"] == ARCH and json.loads(json.dumps(obj["card"]))["arch"] == ARCH
    assert all(v.dtype.is_floating_point is False or v.dtype.itemsize == 2 for v in obj["model"].values())


@pytest.mark.parametrize("split", ["val", "test"])
def test_shipped_clip_reproduces_its_cards_zero_shot_metrics(split):
    p, c = card()
    m = create_model(ARCH)
    load_weights(m, p)
    got = zero_shot_evaluator(split)(m)
    want = c["zero_shot"][split]
    # the card was measured on the same fp16 weights; other BLAS builds may reorder a near-tie or two
    for k in ("R@1", "R@5", "R@10", "mAP"):
        assert got[k] == pytest.approx(want[k], abs=0.15), (split, k, got[k], want[k])
    assert got["R@1"] >= 8, "the analogue's zero-shot R@1 target (at least 8) is not met"


def test_concurrent_callers_build_a_missing_small_clip_once(tmp_path, monkeypatch):
    "Runs started together (study --jobs) that need an unbuilt small CLIP: one builds it, the others wait and load it."
    import threading, time
    import tbps_clip.pretrain as pt
    target = tmp_path / "synthclip-tbps-micro.pt"
    monkeypatch.setattr(pt, "shipped_synthclip", lambda arch: None)
    monkeypatch.setattr(pt, "synthclip_path", lambda arch: target)
    builds = []
    def slow_build(arch, progress=True):  # stands in for pretraining: slow, then the file appears
        builds.append(arch); time.sleep(0.3); target.write_bytes(b"weights")
    monkeypatch.setattr(pt, "pretrain_synthclip", slow_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(pt.ensure_synthclip("tbps-micro", progress=False))) for _ in range(3)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert builds == ["tbps-micro"] and got == [target] * 3
