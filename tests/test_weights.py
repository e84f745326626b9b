"""Real CLIP weight formats round-tripped through tiny checkpoints, and eval-only runs (tbps_clip.weights, run, cli)."""
import json
import pickle
import sys

import pytest
import torch

import tbps_clip.weights as W
from tbps_clip.checkpoint import save_checkpoint
from tbps_clip.cli import main
from tbps_clip.config import make_config
from tbps_clip.core import TBPSError
from tbps_clip.datasets import DATASETS, load_annotations
from tbps_clip.fixtures import write_fixture
from tbps_clip.evaluate import evaluate
from tbps_clip.model import create_model
from tbps_clip.run import prepare_model
from tbps_clip.weights import load_weights, read_checkpoint_file

SQ = (32, 32)  # square input, as CLIP was pretrained (224x224 for the real ViT-B/16)


def fp16_exact(model):
    "Round every weight to a value fp16 can hold, so OpenAI's fp16 conversion loses nothing."
    with torch.no_grad():
        for p in model.parameters(): p.copy_(p.half().float())
    return model.eval()


def micro(size=SQ, quick_gelu=True, **kw):
    return create_model("tbps-micro", image_size=size, quick_gelu=quick_gelu, **kw).eval()


def features(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(4, 3, *model.image_size, generator=g)
    tok = torch.randint(1, 49000, (4, model.context_length), generator=g)
    with torch.no_grad():
        return model.encode_image(img), model.encode_text(tok)


def assert_same_features(a, b):
    fa, fb = features(a), features(b)
    assert torch.equal(fa[0], fb[0]) and torch.equal(fa[1], fb[1])


@pytest.fixture(scope="module")
def src():
    torch.manual_seed(1)
    return fp16_exact(micro())


@pytest.fixture(scope="module")
def archive(src, tmp_path_factory):
    return W.write_openai_archive(src, tmp_path_factory.mktemp("w") / "ViT-micro.pt")


@pytest.fixture(scope="module")
def release(src, tmp_path_factory):
    return W.write_tbps_release(src, tmp_path_factory.mktemp("w") / "checkpoint_best.pth")


# ---- OpenAI TorchScript archives ---------------------------------------------------------------------

def test_archive_is_laid_out_like_openai_s(archive):
    assert W.is_torchscript_archive(archive)
    sd = torch.jit.load(str(archive), map_location="cpu").state_dict()
    assert {"input_resolution", "context_length", "vocab_size"} <= set(sd) and "attn_mask" not in sd
    assert sd["visual.conv1.weight"].dtype == torch.float16 and sd["text_projection"].dtype == torch.float16
    assert sd["visual.transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    assert int(sd["input_resolution"]) == 32 and {"visual.class_embedding", "token_embedding.weight", "ln_final.weight"} <= set(sd)
    with pytest.raises(RuntimeError, match="TorchScript"):  # why a reader of its own is needed
        torch.load(archive, weights_only=True)


def test_archive_round_trip_gives_equal_features(src, archive):
    m = micro()
    load_weights(m, archive)
    assert_same_features(src, m)
    assert all(v.dtype == torch.float32 for v in m.state_dict().values() if v.is_floating_point())
    assert m.weights_report["format"] == "OpenAI CLIP TorchScript archive"
    assert torch.equal(m.clip.visual.positional_embedding, src.clip.visual.positional_embedding)  # square grid: unchanged


def test_archive_fitted_to_person_crops(src, archive):
    m = micro(size=(32, 16), context_length=24)
    load_weights(m, archive)
    pe, ref = m.clip.visual.positional_embedding, src.clip.visual.positional_embedding
    assert pe.shape == (1 + 4 * 2, ref.shape[1]) and torch.equal(pe[0], ref[0])  # class token kept
    assert torch.allclose(pe, W.resize_image_pos_embed(ref, (4, 4), (4, 2)))
    tpe = m.clip.positional_embedding
    assert tpe.shape[0] == 24 and torch.equal(tpe[0], src.clip.positional_embedding[0]) and torch.equal(tpe[-1], src.clip.positional_embedding[-1])
    assert any("4x4 to a 4x2 grid" in n for n in m.weights_report["notes"])
    i, t = features(m)
    assert torch.isfinite(i).all() and torch.isfinite(t).all()


def test_vit_b16_grid_resize_matches_open_clip():
    from types import SimpleNamespace
    from open_clip.model import resize_pos_embed
    pe = torch.randn(197, 16)
    sd = {"visual.positional_embedding": pe.clone()}
    resize_pos_embed(sd, SimpleNamespace(visual=SimpleNamespace(grid_size=(24, 8))))
    assert torch.allclose(W.resize_image_pos_embed(pe, W.source_grid(197), (24, 8)), sd["visual.positional_embedding"], atol=1e-6)
    const = torch.ones(197, 3)
    assert torch.allclose(W.resize_image_pos_embed(const, (14, 14), (24, 8)), torch.ones(193, 3), atol=1e-5)


def test_openai_weights_need_quick_gelu(archive):
    with pytest.raises(TBPSError, match=r"ViT-micro.pt: OpenAI's CLIP weights were trained with QuickGELU.*model.quick_gelu=true"):
        load_weights(micro(quick_gelu=False), archive)


def test_other_architecture_is_named(archive):
    with pytest.raises(TBPSError, match=r"another architecture than model.arch=tbps-tiny: vision_width 32 \(model 128\).*Set model.arch to one of: tbps-micro"):
        load_weights(create_model("tbps-tiny", image_size=SQ, quick_gelu=True), archive)


def test_damaged_archive(archive, tmp_path):
    bad = tmp_path / "cut.pt"
    bad.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(TBPSError, match="cut.pt"):
        load_weights(micro(), bad)


def test_build_model_from_config(src, archive):
    cfg = make_config("clip", {"model.arch": "tbps-micro", "model.pretrained": str(archive), "model.quick_gelu": True,
                               "data.image_size": "[32,32]"})
    assert_same_features(src, prepare_model(cfg).eval())


# ---- open_clip checkpoints ----------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["plain", "training", "safetensors"])
def test_open_clip_round_trip(src, layout, tmp_path):
    sd = {k: v.clone() for k, v in src.clip.state_dict().items()}
    if layout == "plain":
        path = tmp_path / "open_clip_pytorch_model.bin"; torch.save(sd, path)
    elif layout == "training":  # open_clip's own training checkpoints (DDP 'module.' prefix)
        path = tmp_path / "epoch_5.pt"; torch.save({"epoch": 5, "name": "x", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "open_clip_model.safetensors"; save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    m = micro()
    load_weights(m, path)
    assert_same_features(src, m)
    assert m.weights_report["format"] == "open_clip state dict"


def test_open_clip_strict_about_keys(src, tmp_path):
    sd = dict(src.clip.state_dict())
    sd.pop("visual.ln_post.bias")
    sd["visual.extra_head.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "x.pt")
    with pytest.raises(TBPSError, match=r"1 missing: clip.visual.ln_post.bias; 1 unexpected: clip.visual.extra_head.weight"):
        load_weights(micro(), tmp_path / "x.pt")


# ---- released TBPS-CLIP checkpoints -------------------------------------------------------------------

def test_release_is_laid_out_like_the_authors(release):
    assert "easydict" not in sys.modules
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(release))
    assert unsafe == ["easydict.EasyDict"]
    with pytest.raises(TBPSError, match="--trust"):  # plain weights_only loading refuses it
        _weights_only(release)
    obj = read_checkpoint_file(release)
    assert set(obj) >= {"model", "optimizer", "config"} and isinstance(obj["config"], dict) and type(obj["config"]) is dict
    assert obj["config"]["experiment"]["input_resolution"] == [32, 32] and "easydict" not in sys.modules
    keys = set(obj["model"])
    assert "encode_text.token_embedding.weight" in keys and "visual.conv1.weight" in keys and "simclr_mlp.0.weight" in keys
    assert obj["optimizer"]["state"]


def _weights_only(path):
    from tbps_clip.weights import CHECKPOINT_READERS
    saved = list(CHECKPOINT_READERS)
    CHECKPOINT_READERS.clear()
    try: return read_checkpoint_file(path)
    finally: CHECKPOINT_READERS[:] = saved


def test_release_round_trip_gives_equal_features(src, release):
    m = micro()
    load_weights(m, release)
    assert_same_features(src, m)
    rep = m.weights_report
    assert rep["format"] == "TBPS-CLIP release" and sorted(rep["dropped_keys"]) == [
        "simclr_mlp.0.bias", "simclr_mlp.0.weight", "simclr_mlp.2.bias", "simclr_mlp.2.weight"]
    assert rep["trained_at"] == dict(input_resolution=[32, 32], text_length=32)


def test_release_at_224_style_grid_into_person_crops(src, release):
    m = micro(size=(48, 16))
    load_weights(m, release)
    assert m.clip.visual.positional_embedding.shape[0] == 1 + 6 * 2


def test_release_strict_about_unknown_keys(src, tmp_path):
    p = W.write_tbps_release(src, tmp_path / "r.pth")
    obj = read_checkpoint_file(p)
    obj["model"]["prompt_learner.ctx"] = torch.zeros(3)
    del obj["model"]["encode_text.ln_final.bias"]
    obj.pop("_foreign_classes"); obj["config"] = None
    torch.save(obj, tmp_path / "r2.pth")
    with pytest.raises(TBPSError, match=r"1 missing: clip.ln_final.bias; 1 unexpected: clip.prompt_learner.ctx"):
        load_weights(micro(), tmp_path / "r2.pth")


def test_release_with_other_python_objects_is_refused(src, tmp_path):
    class Hook:
        def __reduce__(self): return (print, ("this would have run",))
    p = W.write_tbps_release(src, tmp_path / "r.pth")
    obj = read_checkpoint_file(p)
    obj["hook"] = Hook()
    with W._module_named("easydict", EasyDict=W._EasyDict):
        obj["config"] = W._EasyDict(obj["config"])
        torch.save(obj, tmp_path / "evil.pth")
    assert W.read_foreign_containers(tmp_path / "evil.pth") is None
    with pytest.raises(TBPSError, match=r"evil.pth: refused to load.*--trust"):
        load_weights(micro(), tmp_path / "evil.pth")


def test_restricted_unpickler_never_calls_unknown_globals():
    import io
    import os
    class Evil:
        def __reduce__(self): return (os.system, ("echo pwned",))
    with pytest.raises(pickle.UnpicklingError, match="refused to load the global"):
        W.RestrictedUnpickler(io.BytesIO(pickle.dumps(Evil(), protocol=2))).load()
    ok = W.RestrictedUnpickler(io.BytesIO(pickle.dumps({"a": [1, 2.5, "x"], "b": (None, True)}, protocol=2))).load()
    assert ok == {"a": [1, 2.5, "x"], "b": (None, True)}


def test_release_needs_quick_gelu(release):
    with pytest.raises(TBPSError, match="TBPS-CLIP checkpoints were trained with QuickGELU"):
        load_weights(micro(quick_gelu=False), release)


# ---- eval-only runs -----------------------------------------------------------------------------------

def test_eval_only_on_synthpedes_from_a_saved_checkpoint(tmp_path, capsys):
    from tbps_clip.synthpedes import make_synthpedes
    root = make_synthpedes(tmp_path / "synth", n_train_ids=4, n_val_ids=2, n_test_ids=5, progress=False)
    cfg = make_config("clip", {"model.arch": "tbps-micro", "model.pretrained": "none", "data.image_size": "[32,16]",
                               "data.dataset": "synthpedes", "data.root": str(root), "train.device": "cpu"})
    torch.manual_seed(0)
    model = create_model("tbps-micro", (32, 16))
    save_checkpoint(tmp_path / "last.pt", model, cfg)
    out = tmp_path / "res" / "eval.json"
    assert main(["eval", str(tmp_path / "last.pt"), "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["synthetic"] is True and rec["kind"] == "eval" and rec["split"] == "test"
    assert {"R@1", "R@5", "R@10", "mAP", "mINP"} <= set(rec["metrics"]) and rec["config"]["data"]["root"] == str(root)
    ann = load_annotations("synthpedes", str(root))
    direct = evaluate(model.eval(), ann, "test", cfg.data)
    assert all(rec["metrics"][k] == pytest.approx(direct[k]) for k in ("R@1", "R@5", "R@10", "mAP", "mINP"))
    assert "R@1" in capsys.readouterr().out


def test_eval_only_with_openai_weights_on_official_test_file(src, archive, tmp_path):
    root = tmp_path / "CUHK-PEDES"
    write_fixture("cuhk-pedes", root, official=True, n_ids=(3, 2, 4), images_per_id=3)
    for s in ("train", "val"): (root / DATASETS["official"].split_files[s]).unlink()  # evaluation needs the test file only
    out = tmp_path / "eval.json"
    assert main(["eval", str(archive), "model.arch=tbps-micro", "model.quick_gelu=true", "data.image_size=[32,32]",
                 "data.dataset=official", f"data.root={root}", "train.device=cpu", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["synthetic"] is False and rec["dataset"] == "official:CUHK-PEDES"
    assert rec["metrics"]["queries"] == 24 and rec["metrics"]["gallery"] == 12
    assert rec["weights"]["format"] == "OpenAI CLIP TorchScript archive" and rec["config"]["model"]["quick_gelu"] is True
    cfg = make_config("clip", {"data.image_size": "[32,32]"})
    direct = evaluate(src, load_annotations("official", str(root)), "test", cfg.data)
    assert all(rec["metrics"][k] == pytest.approx(direct[k]) for k in ("R@1", "R@5", "R@10", "mAP", "mINP"))


def test_eval_only_with_a_release_on_a_raw_file_without_train_entries(src, release, tmp_path):
    root = tmp_path / "RSTPReid"
    write_fixture("rstpreid", root, n_ids=(0, 0, 4), images_per_id=2)
    out = tmp_path / "eval.json"
    assert main(["eval", str(release), "model.arch=tbps-micro", "model.quick_gelu=true", "data.image_size=[32,32]",
                 "data.normalize=imagenet", "data.dataset=rstpreid", f"data.root={root}", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["dataset"] == "rstpreid" and rec["metrics"]["gallery"] == 8 and rec["weights"]["format"] == "TBPS-CLIP release"
    assert rec["config"]["data"]["normalize"] == "imagenet"
