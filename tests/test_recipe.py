"""The recipe end to end: gradient caching, soft labels, heads in checkpoints, augmentation wiring, every preset."""
import json
import random
import sys
import types

import pytest
import torch

from conftest import micro_overrides
from tbps_clip.augment import CaptionAugmenter, configure_pairs, synonym_source, synonyms
from tbps_clip.config import AugConfig, make_config
from tbps_clip.core import TBPSError
from tbps_clip.heads import attach_heads
from tbps_clip.run import evaluate_checkpoint, load_data, prepare_model, train, train_dataset
from tbps_clip.train import SoftLabels, Trainer, soft_label_alpha

from test_train import Crash, weights


def micro(preset, toy, out, **extra):
    return make_config(preset, micro_overrides(toy, out, **extra))


# ---- gradient caching -------------------------------------------------------------------------------

def step_grads(cfg, chunk: int, batch):
    "Gradients of one training step of `cfg` on `batch`, with gradient caching at `chunk` (0 = off)."
    cfg.train.grad_cache_chunk = chunk
    torch.manual_seed(0)
    model = attach_heads(prepare_model(cfg), cfg, 8)
    cbs = [SoftLabels(cfg.trick.soft_label)] if cfg.trick.soft_label else []
    tr = Trainer(cfg, model, list(range(64)), progress=False, callbacks=cbs)
    tr.step = tr.steps_per_epoch  # soft labels at full alpha
    logs = tr.train_step(batch)
    return logs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["tbps", "irra"])
def test_gradient_caching_gives_the_full_batch_gradients(toy, tmp_path, preset):
    cfg = micro(preset, toy, tmp_path, **{"trick.text_dropout": 0.0, "train.precision": "fp32", "train.device": "cpu",
                                          "data.batch_size": 8})
    ds = train_dataset(cfg, load_data(cfg), (32, 16), 32)
    from tbps_clip.data import collate
    batch = collate([ds[i] for i in range(8)])
    assert {"image_aug", "ss_image_a"} <= set(batch) if preset == "tbps" else {"mlm_text", "mlm_labels"} <= set(batch)
    full_logs, full = step_grads(cfg, 0, batch)
    for chunk in (3, 4):  # uneven and even chunks
        logs, g = step_grads(cfg, chunk, batch)
        assert logs == pytest.approx(full_logs, rel=1e-5)
        assert set(g) == set(full)
        # equal up to float summation order, relative to each tensor's largest entry: each chunk trims its captions
        # to its own longest (exact under the causal mask, other matmul shapes); in float64 they agree to ~1e-14
        for n in full:
            rel = float((g[n] - full[n]).abs().max() / full[n].abs().max().clamp(min=1e-12))
            assert rel < 5e-5, (chunk, n, rel)


def test_gradient_caching_is_deterministic_with_dropout(toy, tmp_path):
    "With dropout, each chunk's re-encoding restores the RNG state of its no-grad pass: the run is repeatable."
    a = train(micro("clip_star", toy, tmp_path / "a", **{"train.grad_cache_chunk": 3, "train.max_steps": 3}), progress=False)
    b = train(micro("clip_star", toy, tmp_path / "b", **{"train.grad_cache_chunk": 3, "train.max_steps": 3}), progress=False)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and a["metrics"]["R@1"] == b["metrics"]["R@1"]
    assert "gradient caching, chunk 3" in (tmp_path / "a" / "log.txt").read_text()


# ---- soft labels ------------------------------------------------------------------------------------

def test_soft_label_alpha_ramps_over_the_first_epoch():
    assert [soft_label_alpha(s, 4, 0.5) for s in range(7)] == [0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert soft_label_alpha(3, 4, 0.5, warmup_epochs=0) == 0.5
    with pytest.raises(TBPSError, match="soft_label_source"):
        SoftLabels(0.5, source="ema")


def test_soft_labels_change_training_and_both_sources_run(toy, tmp_path):
    base = {"train.max_steps": 4, "trick.text_dropout": 0.0}
    hard = train(micro("clip", toy, tmp_path / "h", **base), progress=False)
    soft = train(micro("clip", toy, tmp_path / "s", **base, **{"trick.soft_label": 0.5}), progress=False)
    det = train(micro("clip", toy, tmp_path / "d", **base, **{"trick.soft_label": 0.5, "trick.soft_label_source": "detached"}),
                progress=False)
    # step 0 has alpha 0, so the first losses agree; later ones differ
    hl = [json.loads((tmp_path / x / "history.json").read_text())["train"] for x in ("h", "s", "d")]
    assert hl[0][0]["itc"] == pytest.approx(hl[1][0]["itc"]) and hl[0][-1]["itc"] != pytest.approx(hl[1][-1]["itc"])
    # without dropout the no-grad pass sees exactly the gradient pass's features: both sources agree
    assert hl[1][-1]["itc"] == pytest.approx(hl[2][-1]["itc"], rel=1e-5)


@pytest.mark.parametrize("preset", ["clip_star", "tbps"])
def test_soft_label_sources_give_identical_targets_without_dropout(toy, tmp_path, preset):
    "trick.soft_label_source: the no-grad pass and the detached gradient-pass features are the same inputs."
    from tbps_clip.data import collate
    cfg = micro(preset, toy, tmp_path, **{"trick.text_dropout": 0.0, "train.device": "cpu", "data.batch_size": 8})
    ds = train_dataset(cfg, load_data(cfg), (32, 16), 32)
    model = attach_heads(prepare_model(cfg), cfg, ds.num_classes)
    tr = Trainer(cfg, model, ds, progress=False)
    tr.step = tr.steps_per_epoch  # alpha at its final value
    tr.batch = collate([ds[i] for i in range(8)])
    tr.out = tr.forward(tr.batch)
    feats = {}
    for source in ("nograd", "detached"):
        SoftLabels(0.5, source=source).after_forward(tr)
        feats[source] = tr.loss_ctx.extras["soft"]
    a, b = feats["nograd"], feats["detached"]
    assert set(a) == set(b) and ("image_aug_feats" in a) == (preset == "tbps") and a["alpha"] == b["alpha"] == 0.5
    for k in a:
        if k != "alpha":
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
            assert not b[k].requires_grad  # targets: no gradient flows through them


# ---- resume, checkpoints, heads ---------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tbps"])
def test_resume_is_exact_with_the_full_recipe(toy, tmp_path, preset):
    "Augmentation, extra views, soft labels with warm-up, dropout and a head: resuming gives the same weights."
    extra = {"train.ckpt_every": 4, "train.epochs": 2}
    full = train(micro(preset, toy, tmp_path / "full", **extra), progress=False)
    cfg = micro(preset, toy, tmp_path / "cut", **extra)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, callbacks=[Crash(5)])
    resumed = train(cfg, progress=False, resume=True)
    wf, wr = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert any(k.startswith("heads.ss_image.") for k in wf)  # the SS head is saved with the model
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert resumed["metrics"]["R@1"] == full["metrics"]["R@1"] and resumed["metrics"]["mAP"] == full["metrics"]["mAP"]


def test_checkpoint_with_heads_evaluates_and_initialises_other_runs(toy, tmp_path):
    rec = train(micro("irra", toy, tmp_path / "a", **{"train.max_steps": 2}), progress=False)
    ckpt = tmp_path / "a" / "checkpoint.pt"
    assert any(k.startswith("heads.mlm.") for k in weights(tmp_path / "a"))
    ev = evaluate_checkpoint(str(ckpt))
    assert ev["metrics"]["R@1"] == pytest.approx(rec["metrics"]["R@1"])
    # IRRA-trained weights as the initialisation of a TBPS-CLIP run: heads are left out, the run makes its own
    rec2 = train(micro("tbps", toy, tmp_path / "b", **{"train.max_steps": 2, "model.pretrained": str(ckpt)}), progress=False)
    assert rec2["steps"] == 2 and not any(k.startswith("heads.mlm") for k in weights(tmp_path / "b"))


def test_heads_get_the_larger_learning_rate(toy, tmp_path):
    "The classifier and MLM's cross-attention, transformer and vocabulary head; not MLM's layer norms (as the official)."
    cfg = micro("irra", toy, tmp_path, **{"optim.head_lr_mult": 5.0})
    model = attach_heads(prepare_model(cfg), cfg, 8)
    tr = Trainer(cfg, model, list(range(64)), progress=False)
    mlm = model.heads["mlm"]
    heads = {id(p) for m in (model.heads["classifier"], mlm.cross_attn, mlm.transformer, mlm.head) for p in m.parameters()}
    assert len(heads) == len(list(model.heads.parameters())) - 6  # ln_pre_t, ln_pre_i, ln_post: weight and bias
    for g in tr.opt.param_groups:
        assert g["lr_mult"] == (5.0 if id(g["params"][0]) in heads else 1.0)
        assert all((id(p) in heads) == (g["lr_mult"] == 5.0) for p in g["params"])


# ---- augmentation wiring ----------------------------------------------------------------------------

def test_items_are_seeded_and_views_differ(toy, tmp_path):
    cfg = micro("tbps", toy, tmp_path, **{"aug.image": "pool"})
    ann = load_data(cfg)
    ds, ds2 = train_dataset(cfg, ann, (32, 16), 32), train_dataset(cfg, ann, (32, 16), 32)
    a, b = ds[3], ds2[3]
    assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)  # same seed, same item
    assert not torch.equal(a["image"], a["image_aug"]) and not torch.equal(a["ss_image_a"], a["ss_image_b"])
    ds2.set_epoch(1)
    assert not torch.equal(ds2[3]["image"], a["image"])  # another epoch, other draws


def test_text_views_and_mlm_fields(toy, tmp_path):
    cfg = micro("clip", toy, tmp_path, **{"aug.rd": 0.3, "aug.bt": 0.5, "loss.mvs_t": 1.0, "loss.ss_t": 0.4, "loss.mlm": 1.0})
    ds = train_dataset(cfg, load_data(cfg), (32, 16), 32)
    items = [ds[i] for i in range(12)]
    assert any(not torch.equal(it["text"], it["text_aug"]) for it in items)
    assert any(not torch.equal(it["ss_text_a"], it["ss_text_b"]) for it in items)
    assert all(((it["mlm_labels"] != -100).sum() >= 1) for it in items)


def test_views_that_would_equal_the_original_are_refused(toy, tmp_path):
    with pytest.raises(TBPSError, match="aug.image=none"):
        train_dataset(micro("clip", toy, tmp_path, **{"loss.mvs_i": 1.0}), load_data(micro("clip", toy, tmp_path)), (32, 16), 32)
    with pytest.raises(TBPSError, match="no text augmentation"):
        train_dataset(micro("clip", toy, tmp_path, **{"loss.ss_t": 1.0}), load_data(micro("clip", toy, tmp_path)), (32, 16), 32)
    with pytest.raises(TBPSError, match="aug.image='bogus'"):
        train(micro("clip", toy, tmp_path, **{"aug.image": "bogus"}), progress=False)


def test_captions_are_deterministic_and_never_empty():
    aug = CaptionAugmenter(AugConfig(rd=1.0, sr=0.3, ri=0.2, rs=0.2, eda=0.2, bt=0.5))
    caps = ["A man in a red shirt.", "jeans", "!!", "a woman with a black backpack and white shoes"]
    for s in range(200):
        for c in caps:
            out = aug(c, "someone in red", random.Random(s))
            assert out.strip() and out == aug(c, "someone in red", random.Random(s))


def test_back_translation_rate_and_missing_bt():
    aug = CaptionAugmenter(AugConfig(bt=0.1))
    n = sum(aug("a red shirt", "crimson top", random.Random(s)) == "crimson top" for s in range(2000))
    assert 150 < n < 250  # about 10%
    assert all(aug("a red shirt", None, random.Random(s)) == "a red shirt" for s in range(50))
    assert all(aug("a red shirt", "  ", random.Random(s)) == "a red shirt" for s in range(50))


def test_wordnet_is_used_when_installed(monkeypatch):
    "A stand-in for nltk's WordNet reader: synonyms come from it and the source says so."
    import tbps_clip.augment as A

    class Lemma:
        def __init__(self, n): self._n = n
        def name(self): return self._n

    class Syn:
        def __init__(self, *ns): self._ls = [Lemma(n) for n in ns]
        def lemmas(self): return self._ls

    wn = types.SimpleNamespace(synsets=lambda w: [Syn("shirt", "top_shirt", "Blouse-3")] if w == "shirt" else [])
    corpus = types.ModuleType("nltk.corpus"); corpus.wordnet = wn
    nltk = types.ModuleType("nltk"); nltk.corpus = corpus
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.corpus", corpus)
    A._wordnet.cache_clear(); A.synonyms.cache_clear()
    try:
        assert A.synonym_source() == "wordnet"
        assert A.synonyms("shirt") == ("blouse", "top shirt")
    finally:
        monkeypatch.undo()
        A._wordnet.cache_clear(); A.synonyms.cache_clear()
    assert A.synonym_source() == ("wordnet" if A._wordnet() else "lexicon")


def test_run_log_and_record_name_the_synonym_source(toy, tmp_path):
    rec = train(micro("clip", toy, tmp_path, **{"train.max_steps": 1, "aug.sr": 0.1}), progress=False)
    assert rec["text_synonyms"] == synonym_source()
    assert f"synonyms from {synonym_source()}" in (tmp_path / "log.txt").read_text()


# ---- every preset, end to end -----------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["clip_star", "simplified", "tbps", "irra"])
def test_every_preset_trains(toy, tmp_path, preset):
    rec = train(micro(preset, toy, tmp_path, **{"train.max_steps": 3}), progress=False)
    hist = json.loads((tmp_path / "history.json").read_text())["train"]
    assert rec["steps"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    from tbps_clip.losses import loss_weights
    assert set(hist[-1]) >= set(loss_weights(make_config(preset).loss))


@pytest.mark.parametrize("cmd, preset", [("demo", "tbps"), ("train", "simplified")])
def test_tbps_and_simplified_on_synthpedes_through_the_cli(tmp_path, cmd, preset, capsys):
    from tbps_clip.cli import main
    from tbps_clip.synthpedes import make_synthpedes
    root = make_synthpedes(tmp_path / "sp", n_train_ids=6, n_val_ids=2, n_test_ids=3, progress=False)
    out = tmp_path / "run"
    assert main([cmd, "--preset", preset, "--out", str(out), f"data.root={root}", "model.arch=tbps-micro",
                 "model.pretrained=none", "data.image_size=[32,16]", "data.batch_size=8", "train.max_steps=2"]) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["synthetic"] is True and rec["preset"] == preset and rec["steps"] == 2
    assert "(synthetic)" in capsys.readouterr().out
    assert "image aug pool; text aug on" in (out / "log.txt").read_text()
