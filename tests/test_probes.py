"""The probes: few-shot subsets, CoOp and CLIP-Adapter, module removal and interpolation (C1, C2), text layers
dropped or frozen with exact parameter counts, and IRRA initialised from a TBPS-CLIP checkpoint."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import micro_overrides
from tbps_clip.checkpoint import save_checkpoint, tower_state
from tbps_clip.config import make_config
from tbps_clip.core import TBPSError, seed_everything
from tbps_clip.importance import (ModuleRef, c1_scores, criticality, interpolated, layer_importance,
                                  least_important_layers, module_importance, module_parameters, module_refs,
                                  removal_drops, removed, removed_modules)
from tbps_clip.model import create_model, text_blocks
from tbps_clip.data import fewshot_pids, fewshot_subset
from tbps_clip.probes import (adapter_parameters, apply_edits, coop_parameters, count_parameters, layer_parameters,
                              trainable_parameters)
from tbps_clip.annotations import Annotations, Entry, read_annotations
from tbps_clip.run import evaluate_checkpoint, prepare_model, train
from tbps_clip.text import tokenize
from tbps_clip.train import Trainer
from tbps_clip.weights import read_checkpoint_file

from test_train import Crash

W = 32  # the micro architecture's width (both towers) and embedding size


def micro(preset, toy, out, **extra):
    return make_config(preset, micro_overrides(toy, out, **extra))


def state(path):
    return read_checkpoint_file(path)["model"]


@pytest.fixture
def base(tmp_path):
    "A saved random micro model: the 'pretrained' weights the probes start from."
    torch.manual_seed(123)
    return save_checkpoint(tmp_path / "base.pt", create_model("tbps-micro"))


# ---- few-shot ---------------------------------------------------------------------------------------

def test_fewshot_draw_is_seeded_nested_and_keeps_whole_identities():
    entries = [Entry(f"{p}_{k}.png", p, ["c", "d"], "train") for p in range(300) for k in range(2)]
    entries += [Entry(f"v{p}.png", 1000 + p, ["c"], "val") for p in range(7)]
    ann = Annotations(entries, image_root=".")
    pids = [r.pid for r in ann.split("train")]
    draws = [set(fewshot_pids(pids, f, seed=3)) for f in (0.01, 0.05, 0.1)]
    assert [len(d) for d in draws] == [3, 15, 30] and draws[0] < draws[1] < draws[2]
    assert fewshot_pids(pids, 0.1, 3) == fewshot_pids(list(reversed(pids)), 0.1, 3)  # record order is irrelevant
    assert fewshot_pids(pids, 0.1, 3) != fewshot_pids(pids, 0.1, 4)
    assert len(fewshot_pids(range(5), 0.01)) == 1 and fewshot_pids(range(5), 1.0) == list(range(5))
    sub, rep = fewshot_subset(ann, 0.05, 3)
    kept = sub.split("train")
    assert {r.pid for r in kept} == draws[1] and len(kept) == 30 and len(sub.split("val")) == 7
    assert (rep["ids"], rep["images"], rep["pairs"], rep["of_ids"], rep["of_pairs"]) == (15, 30, 60, 300, 1200)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(TBPSError, match="data.fewshot"): fewshot_pids(pids, bad)


def test_fewshot_run_trains_on_the_subset_and_records_it(toy, tmp_path):
    cfg = micro("clip", toy, tmp_path, **{"data.fewshot": 0.25, "data.fewshot_seed": 1, "data.batch_size": 4,
                                          "train.max_steps": 2})
    rec = train(cfg, progress=False)
    ann = read_annotations(toy)
    want = fewshot_pids([r.pid for r in ann.split("train")], 0.25, 1)
    fs = rec["fewshot"]
    assert len(want) == 2 and fs["pids"] == want and fs["ids"] == rec["train_ids"] == 2
    assert fs["pairs"] == rec["train_pairs"] == 2 * 3 * 2 and fs["of_ids"] == 8 and fs["of_pairs"] == 48
    assert rec["metrics"]["queries"] == 24  # the test split is whole
    assert "few-shot 0.25 of the training identities" in (tmp_path / "log.txt").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["fewshot"] == fs


# ---- CoOp and CLIP-Adapter ---------------------------------------------------------------------------

def test_coop_at_initialisation_is_the_prompt_written_out():
    torch.manual_seed(0)
    m = create_model("tbps-micro").eval()
    caps = ["a man in a red coat", "a woman in black " * 12, "a red bag"]  # the second one fills the context
    with torch.no_grad(): ref = m.encode_text(tokenize(["a pedestrian photo of " + c for c in caps], m.context_length))
    apply_edits(m, {"probe": dict(kind="coop", init="a pedestrian photo of", n_ctx=0)})
    tok = tokenize(caps, m.context_length)
    assert int(tok[1].argmax()) == m.context_length - 1 and m.probe.n_ctx == 4
    with torch.no_grad():
        trimmed, full = m.encode_text(tok), F.normalize(m.clip.encode_text(tok), dim=-1)
    assert torch.allclose(trimmed, ref, atol=1e-5) and torch.allclose(full, ref, atol=1e-5)
    with torch.no_grad(): m.probe.ctx.add_(torch.randn_like(m.probe.ctx))  # the vectors, not the words, are what the tower sees
    with torch.no_grad(): assert not torch.allclose(m.encode_text(tok), ref, atol=1e-3)


def test_adapter_mixes_image_features_with_alpha():
    torch.manual_seed(0)
    m = create_model("tbps-micro").eval()
    x = torch.randn(3, 3, 32, 16)
    with torch.no_grad(): f = m.clip.encode_image(x)
    apply_edits(m, {"probe": dict(kind="adapter", alpha=0.4, reduction=4)})
    with torch.no_grad():
        a = F.relu(F.relu(f @ m.probe.fc[0].weight.T) @ m.probe.fc[2].weight.T)  # CLIP-Adapter's MLP written out
        assert torch.allclose(m.encode_image(x), F.normalize(0.4 * a + 0.6 * f, dim=-1), atol=1e-6)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["probe.fc.0.weight", "probe.fc.2.weight"]


@pytest.mark.parametrize("probe,count", [("coop", coop_parameters(4, W)), ("adapter", adapter_parameters(W, 4))])
def test_probe_trains_only_itself_saves_and_evaluates(toy, tmp_path, base, probe, count):
    assert count == {"coop": 4 * W, "adapter": 2 * W * (W // 4)}[probe]
    cfg = micro("clip", toy, tmp_path / "run", **{"model.probe": probe, "model.pretrained": str(base),
                                                 "train.max_steps": 3, "optim.lr": 1e-2})
    model = prepare_model(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("probe.") for n in trainable)
    assert count_parameters(model)["trainable"] == count
    opt = Trainer(cfg, model, list(range(64)), progress=False).opt
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == count
    rec = train(cfg, progress=False)
    assert rec["parameters"]["trainable"] == count and rec["model_edits"]["probe"]["kind"] == probe
    sd, sd0 = state(tmp_path / "run" / "checkpoint.pt"), state(base)
    assert all(torch.equal(sd[k], v) for k, v in sd0.items())  # the backbone did not move
    probe_keys = [k for k in sd if k.startswith("probe.")]
    assert sum(sd[k].numel() for k in probe_keys) == count
    if probe == "coop":  # initialised from the token embeddings of "a pedestrian photo of", then trained
        ids = tokenize(["a pedestrian photo of"], 32)[0][1:5]
        assert not torch.equal(sd["probe.ctx"], sd0["clip.token_embedding.weight"][ids])
    # strict loading rebuilds the probe from the checkpoint's identity, then loads it; evaluation reproduces the run
    ev = evaluate_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert ev["metrics"]["R@1"] == rec["metrics"]["R@1"] and ev["metrics"]["mAP"] == rec["metrics"]["mAP"]


@pytest.mark.parametrize("extra", [{"model.probe": "coop"}, {"model.drop_text_layers": [1], "train.freeze_text_layers": [0]}])
def test_edited_runs_resume_exactly(toy, tmp_path, base, extra):
    over = {"model.pretrained": str(base), "train.max_steps": 6, "train.ckpt_every": 2, "trick.text_dropout": 0.1, **extra}
    train(micro("clip", toy, tmp_path / "full", **over), progress=False)
    cfg = micro("clip", toy, tmp_path / "cut", **over)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, callbacks=[Crash(3)])
    train(cfg, progress=False, resume=True)
    wf, wr = state(tmp_path / "full" / "checkpoint.pt"), state(tmp_path / "cut" / "checkpoint.pt")
    assert set(wf) == set(wr) and all(torch.equal(wf[k], wr[k]) for k in wf)


def test_probe_settings_must_match_the_checkpoint(toy, tmp_path, base):
    cfg = micro("clip", toy, tmp_path / "a", **{"model.probe": "coop", "model.pretrained": str(base), "train.max_steps": 1})
    train(cfg, progress=False)
    ck = str(tmp_path / "a" / "checkpoint.pt")
    with pytest.raises(TBPSError, match="does not ask for"):
        prepare_model(micro("clip", toy, tmp_path / "b", **{"model.pretrained": ck}))
    with pytest.raises(TBPSError, match="conflicts"):
        prepare_model(micro("clip", toy, tmp_path / "b", **{"model.pretrained": ck, "model.probe": "adapter"}))
    with pytest.raises(TBPSError, match="model.probe"):
        prepare_model(micro("clip", toy, tmp_path / "b", **{"model.probe": "prompt"}))
    with pytest.raises(TBPSError, match="coop_n_ctx"):
        prepare_model(micro("clip", toy, tmp_path / "b", **{"model.probe": "coop", "model.coop_n_ctx": 7}))


# ---- module removal and interpolation ----------------------------------------------------------------

@pytest.fixture
def pair():
    "(pretrained model, trained model, text tokens, images): two differently initialised micro models."
    torch.manual_seed(1)
    pre = create_model("tbps-micro").eval()
    torch.manual_seed(2)
    trained = create_model("tbps-micro").eval()
    return pre, trained, tokenize(["a man in a red coat", "blue trousers"], 32), torch.randn(2, 3, 32, 16)


def test_removal_changes_the_output_and_restores_it_bit_for_bit(pair):
    _, m, tok, x = pair
    with torch.no_grad():
        t0, i0 = m.encode_text(tok), m.encode_image(x)
        for ref in module_refs(m):
            with removed(m, ref):
                changed = m.encode_text(tok) if ref.tower == "text" else m.encode_image(x)
                same = m.encode_image(x) if ref.tower == "text" else m.encode_text(tok)
            assert not torch.allclose(changed, t0 if ref.tower == "text" else i0, atol=1e-4), ref.name
            assert torch.equal(same, i0 if ref.tower == "text" else t0)
            assert torch.equal(m.encode_text(tok), t0) and torch.equal(m.encode_image(x), i0)
        with pytest.raises(RuntimeError):  # restored even when the block raises
            with removed(m, ModuleRef("text", 0, "layer")): raise RuntimeError
        assert removed_modules(m) == [] and torch.equal(m.encode_text(tok), t0)
        # a removed layer is the identity: the text tower with layer 1 removed is layer 0 alone
        with removed(m, ModuleRef("text", 1, "layer")): one = m.encode_text(tok)
        blk = text_blocks(m)[1]
        m.clip.transformer.resblocks = m.clip.transformer.resblocks[:1]
        assert torch.equal(m.encode_text(tok), one)
        m.clip.transformer.resblocks.append(blk)


def test_interpolation_ends_are_exact_and_the_model_is_restored(pair):
    pre, m, tok, x = pair
    theta0 = pre.state_dict()
    with torch.no_grad():
        t0, i0, tp = m.encode_text(tok), m.encode_image(x), pre.encode_text(tok)
        every = [ModuleRef("text", l, "layer") for l in range(2)]
        for ref in module_refs(m):
            with interpolated(m, ref, theta0, 1.0): assert torch.equal(m.encode_text(tok), t0) and torch.equal(m.encode_image(x), i0)
            with interpolated(m, ref, theta0, 0.0):
                assert all(torch.equal(p, theta0[n]) for n, p in module_parameters(m, ref).items())
            with interpolated(m, ref, theta0, 0.3):
                assert not torch.equal(m.encode_text(tok) if ref.tower == "text" else m.encode_image(x),
                                       t0 if ref.tower == "text" else i0)
        assert torch.equal(m.encode_text(tok), t0) and torch.equal(m.encode_image(x), i0)
        # every text layer at alpha 0 and the rest of the text tower swapped in: the pretrained text tower
        with interpolated(m, every[0], theta0, 0.0), interpolated(m, every[1], theta0, 0.0):
            rest = {k: v for k, v in pre.state_dict().items() if k.startswith("clip.") and "resblocks" not in k
                    and not k.startswith("clip.visual")}
            kept = {k: m.state_dict()[k].clone() for k in rest}
            m.load_state_dict(rest, strict=False)
            assert torch.equal(m.encode_text(tok), tp)
            m.load_state_dict(kept, strict=False)
    with pytest.raises(TBPSError, match="lack"):
        with interpolated(m, every[0], {}, 0.5): pass


def test_c1_and_c2_on_a_toy_evaluation(pair):
    pre, m, _, _ = pair
    theta0 = pre.state_dict()
    ff = ModuleRef("text", 1, "ff")
    trained = {n: p.detach().clone() for n, p in module_parameters(m, ff).items()}
    pen = {"image.0.sa": 2.0, "text.0.ff": 8.0, "text.1.sa": 4.0}

    def toy(model):  # 70 - penalties of removed modules - 12 x (how far text.1.ff is from its trained weights, 0..1)
        far = sum((p.detach() - trained[n]).norm() for n, p in module_parameters(model, ff).items())
        full = sum((theta0[n] - trained[n]).norm() for n in trained)
        return {"R@1": 70.0 - sum(pen.get(k, 0.0) for k in removed_modules(model)) - 12.0 * float(far / full)}

    rows = {r["name"]: r for r in module_importance(m, toy, theta0)}
    assert len(rows) == 12 and all(r["baseline"] == 70.0 for r in rows.values())
    assert {k: rows[k]["c1"] for k in pen} == {"image.0.sa": 0.25, "text.0.ff": 1.0, "text.1.sa": 0.5}
    assert rows["text.0.ff"]["drop"] == 8.0 and rows["image.1.layer"]["c1"] == 0.0
    # drop(alpha) = 12 (1 - alpha) < 3  <=>  alpha > 0.75: C2 = 0.8 for text.1.ff and the layer that holds it
    assert rows["text.1.ff"]["c2"] == rows["text.1.layer"]["c2"] == 0.8
    assert all(r["c2"] == 0.0 for k, r in rows.items() if k not in ("text.1.ff", "text.1.layer"))
    assert [float(a) for a in rows["text.1.ff"]["curve"]] == [1.0, 0.9, 0.8, 0.7]  # walked down, stopped at the first failure
    scores = layer_importance(list(rows.values()))
    assert scores == pytest.approx({0: 1.0, 1: 0.5 + 0.8 + 0.8}) and least_important_layers(scores, 1) == [0]
    assert layer_importance(list(rows.values()), "image") == pytest.approx({0: 0.25, 1: 0.0})
    assert least_important_layers(layer_importance(list(rows.values()), "image"), 1) == [1]


def test_criticality_needs_the_drop_to_stay_under_eps():
    m = create_model("tbps-micro")
    ref = ModuleRef("text", 0, "sa")
    theta0 = {n: torch.zeros_like(p) for n, p in module_parameters(m, ref).items()}
    w = next(iter(module_parameters(m, ref)))
    trained = module_parameters(m, ref)[w].detach().clone()
    drops = {0.0: 1.0, 0.25: 5.0, 0.5: 2.99, 0.75: 0.5}  # not monotone: alpha 0 passes, 0.25 does not

    def toy(model):
        p = module_parameters(model, ref)[w].detach()
        a = round(float((p / trained)[trained.abs() > 1e-3].mean()), 6)
        return 50.0 - drops.get(a, 0.0)

    c2, curve = criticality(m, toy, theta0, ref, eps=3.0, grid=(0, 0.25, 0.5, 0.75, 1))
    assert c2 == 0.5 and curve == pytest.approx({1.0: 50.0, 0.75: 49.5, 0.5: 47.01, 0.25: 45.0})
    assert criticality(m, toy, theta0, ref, eps=5.5, grid=(0, 0.25, 0.5, 0.75, 1))[0] == 0.0
    assert c1_scores({"a": -1.0, "b": 4.0, "c": 2.0}) == {"a": -0.25, "b": 1.0, "c": 0.5}
    assert c1_scores({"a": -1.0, "b": 0.0}) == {"a": 0.0, "b": 0.0}
    assert removal_drops(m, lambda mm: 7.0, [ref]) == {"text.0.sa": 0.0}


# ---- compression: dropping and freezing text layers ----------------------------------------------------

def test_layer_sizes_match_the_real_modules():
    for arch, w in (("tbps-micro", 32), ("tbps-tiny", 128), ("ViT-B-16", 512)):
        m = create_model(arch, device="meta")
        lp = layer_parameters(w)
        assert (lp["attn"], lp["mlp"], lp["norms"]) == (4 * w * w + 4 * w, 8 * w * w + 5 * w, 4 * w)
        n = lambda mod: sum(p.numel() for p in mod.parameters())
        for b in text_blocks(m):
            assert (n(b.attn), n(b.mlp), n(b.ln_1) + n(b.ln_2), n(b)) == (lp["attn"], lp["mlp"], lp["norms"], lp["layer"])


def test_vit_b16_trainable_counts_follow_the_layer_sizes():
    "ViT-B/16 at 224 x 224 with the Simplified recipe (patch embedding locked), x text layers dropped or frozen."
    m = create_model("ViT-B-16", (224, 224), device="meta")
    total, conv1, layer = count_parameters(m)["total"], m.clip.visual.conv1.weight.numel(), layer_parameters(512)["layer"]
    assert (total, conv1, layer) == (149_620_737, 768 * 3 * 16 * 16, 3_152_384)
    base = {"model.arch": "ViT-B-16", "data.image_size": [224, 224]}
    for ids in ((3, 5, 7),):
        for key in ("model.drop_text_layers", "train.freeze_text_layers"):
            got = trainable_parameters(make_config("simplified", {**base, key: list(ids)}))
            assert got["trainable"] == total - conv1 - len(ids) * layer, (key, ids)
    ss_head = 512 * 128 + 128 + 128 * 512 + 512  # TBPS-CLIP's SS-I projection trains too
    assert trainable_parameters(make_config("tbps", base))["trainable"] == total - conv1 + ss_head  # x = 0


def test_dropped_layers_train_save_and_evaluate(toy, tmp_path, base):
    cfg = micro("clip", toy, tmp_path / "run", **{"model.pretrained": str(base), "model.drop_text_layers": [0],
                                                 "train.max_steps": 2})
    model = prepare_model(cfg)
    sd0 = state(base)
    assert len(text_blocks(model)) == 1 and torch.equal(text_blocks(model)[0].attn.in_proj_weight,
                                                        sd0["clip.transformer.resblocks.1.attn.in_proj_weight"])
    assert count_parameters(model)["total"] == count_parameters(create_model("tbps-micro"))["total"] - layer_parameters(W)["layer"]
    rec = train(cfg, progress=False)
    sd = state(tmp_path / "run" / "checkpoint.pt")
    assert not any(k.startswith("clip.transformer.resblocks.1.") for k in sd)
    assert rec["model_edits"] == {"drop_text_layers": [0]}
    ev = evaluate_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert ev["metrics"]["R@1"] == rec["metrics"]["R@1"] and ev["metrics"]["mAP"] == rec["metrics"]["mAP"]
    with pytest.raises(TBPSError, match="out of range"):
        prepare_model(micro("clip", toy, tmp_path / "b", **{"model.drop_text_layers": [2]}))


def test_frozen_layers_stay_out_of_the_optimiser_and_do_not_move(toy, tmp_path, base):
    cfg = micro("clip", toy, tmp_path / "run", **{"model.pretrained": str(base), "train.freeze_text_layers": [1],
                                                 "train.max_steps": 3, "optim.weight_decay": 0.5})
    model = prepare_model(cfg)
    frozen = {id(p) for p in text_blocks(model)[1].parameters()}
    opt = Trainer(cfg, model, list(range(64)), progress=False).opt
    assert not any(id(p) in frozen for g in opt.param_groups for p in g["params"])
    lw = layer_parameters(W)["layer"]
    assert count_parameters(model)["trainable"] == count_parameters(model)["total"] - lw
    rec = train(cfg, progress=False)
    assert rec["parameters"]["trainable"] == rec["parameters"]["total"] - lw
    sd, sd0 = state(tmp_path / "run" / "checkpoint.pt"), state(base)
    layer1 = [k for k in sd0 if k.startswith("clip.transformer.resblocks.1.")]
    assert len(layer1) == 12 and all(torch.equal(sd[k], sd0[k]) for k in layer1)
    assert not torch.equal(sd["clip.transformer.resblocks.0.attn.in_proj_weight"],
                           sd0["clip.transformer.resblocks.0.attn.in_proj_weight"])


# ---- IRRA initialised from a TBPS-CLIP checkpoint -------------------------------------------------------

def test_irra_trains_from_a_tbps_checkpoint(toy, tmp_path):
    tb = train(micro("tbps", toy, tmp_path / "tbps", **{"train.max_steps": 2}), progress=False)
    ck = tmp_path / "tbps" / "checkpoint.pt"
    saved = tower_state(state(ck))
    cfg = micro("irra", toy, tmp_path / "irra", **{"model.pretrained": str(ck), "train.max_steps": 2})
    seed_everything(0)
    model = prepare_model(cfg)
    own = model.state_dict()
    assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in saved)  # the TBPS-CLIP weights
    rec = train(cfg, progress=False, zero_shot=True)
    assert rec["zero_shot"]["R@1"] == tb["metrics"]["R@1"] and rec["zero_shot"]["mAP"] == tb["metrics"]["mAP"]
    sd = state(tmp_path / "irra" / "checkpoint.pt")
    assert any(k.startswith("heads.mlm.") for k in sd) and any(k.startswith("heads.classifier.") for k in sd)
    assert not any(k.startswith("heads.ss_image.") for k in sd)  # TBPS-CLIP's SS head is not carried over


def test_edited_models_are_not_exported_to_foreign_layouts(tmp_path):
    "An OpenAI archive or a TBPS-CLIP release has no place for dropped layers or probes: refused, not silently lost."
    from tbps_clip.core import TBPSError
    from tbps_clip.model import create_model
    from tbps_clip.probes import drop_text_layers
    from tbps_clip.weights import write_tbps_release
    m = create_model("tbps-micro")
    drop_text_layers(m, [0])
    with pytest.raises(TBPSError, match="edited model"):
        write_tbps_release(m, tmp_path / "release.pth")
    assert not (tmp_path / "release.pth").exists()


def test_a_single_layer_id_is_a_one_element_tuple():
    from tbps_clip.config import make_config
    assert make_config("clip", {"model.drop_text_layers": "3"}).model.drop_text_layers == (3,)
    assert make_config("clip", {"train.freeze_text_layers": "3,7"}).train.freeze_text_layers == (3, 7)
