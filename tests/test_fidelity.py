"""Where the project follows the official TBPS-CLIP code, pinned against the official behaviour described in words.

Each test writes the rule from its definition (the paper, the formula, or what the official code does, said in
words), never from the official code itself. docs/fidelity.md lists every component and the test that pins it.
"""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from open_clip.transformer import QuickGELU
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from conftest import micro_overrides
from tbps_clip.augment import KEPT_OPS, CaptionAugmenter, Pool, PILGaussianBlur, image_transform, simclr_transform
from tbps_clip.config import NORMALIZE, AugConfig, LossConfig, OptimConfig, make_config
from tbps_clip.core import TBPSError
from tbps_clip.data import test_transform as eval_transform
from tbps_clip.heads import MLMHead, attach_heads
from tbps_clip.losses import LossContext, compute_losses, itc, nitc
from tbps_clip.model import create_model, image_blocks, text_blocks
from tbps_clip.run import prepare_model, train
from tbps_clip.text import EOT_TOKEN, SOT_TOKEN, clean_caption, tokenize
from tbps_clip.train import Callback, lr_at, make_optimizer, param_groups

LN100 = math.log(100.0)


# ---- 1. the logit scale ----------------------------------------------------------------------------------

def official_logit_scale(t: torch.Tensor) -> torch.Tensor:
    "The official rule in its own form: exp(t), then its `.data` overwritten by the clamp (autograd keeps exp's output)."
    s = t.exp()
    s.data = torch.clamp(s.data, max=100)
    return s


def test_logit_scale_clamps_the_value_and_keeps_the_unclamped_gradient():
    "Official: the used scale is min(exp(t), 100) and d scale / d t is exp(t), unclamped (100.003 at OpenAI's 4.6052)."
    m = create_model("tbps-micro")
    for t in (4.6052, LN100 + 0.01, LN100 + 1.0, LN100 - 0.5, math.log(1 / 0.07)):
        ref = torch.tensor(t, requires_grad=True)
        official_logit_scale(ref).backward()
        m.clip.logit_scale.grad = None
        with torch.no_grad(): m.clip.logit_scale.fill_(t)
        s = m.logit_scale
        s.backward()
        assert s.item() == pytest.approx(min(math.exp(t), 100.0), rel=1e-6) and s.item() <= 100.0
        assert m.clip.logit_scale.grad.item() == pytest.approx(math.exp(t), rel=1e-6)  # exp(t), also above the clamp
        assert m.clip.logit_scale.grad.item() == pytest.approx(ref.grad.item(), rel=1e-6)  # the official rule itself
    with torch.no_grad(): m.clip.logit_scale.fill_(LN100 + 1.0)
    m.clip.logit_scale.grad = None
    m.logit_scale.backward()
    assert m.clip.logit_scale.grad.item() > 270  # e^5.6 = 271.8, not the clamped 100: the rule is pinned, not just near it


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_logit_scale_from_openai_weights_trains_and_never_exceeds_100(direction):
    "From OpenAI's log-scale (just above ln 100) AdamW moves the scale either way; the used value never exceeds 100."
    m = create_model("tbps-micro")
    with torch.no_grad(): m.clip.logit_scale.fill_(4.6052)  # OpenAI's weights: exp = 100.003
    opt = make_optimizer(m, OptimConfig(lr=0.05, fused=False))
    used = []
    for _ in range(5):
        opt.zero_grad()
        (-direction * m.logit_scale).backward()  # direction 1: a loss that wants a larger scale; -1: a smaller one
        assert m.clip.logit_scale.grad.item() == pytest.approx(-direction * m.clip.logit_scale.exp().item())
        opt.step()
        used.append(m.logit_scale.item())
    assert max(used) <= 100.0
    if direction < 0: assert used[-1] < 80.0  # it trains down from OpenAI's value instead of staying clamped
    else: assert used == [100.0] * 5 and m.clip.logit_scale.item() > 4.6052 + 0.2  # as the official: the parameter may rise


# ---- 2. the MLM head's blocks ------------------------------------------------------------------------------

def test_mlm_cross_modal_blocks_use_quick_gelu():
    "Official: the cross-modal transformer's MLP is c_fc, QuickGELU x * sigmoid(1.702 x), c_proj."
    torch.manual_seed(0)
    head = MLMHead(64, 100, depth=2)
    x = torch.randn(3, 5, 64)
    for blk in head.transformer.resblocks:
        assert type(blk.mlp.gelu) is QuickGELU
        h = blk.mlp.c_fc(x)
        want = blk.mlp.c_proj(h * torch.sigmoid(1.702 * h))
        assert torch.allclose(blk.mlp(x), want, atol=1e-6)
        assert not torch.allclose(blk.mlp(x), blk.mlp.c_proj(F.gelu(h)), atol=1e-4)


# ---- 3. the learning-rate schedule -------------------------------------------------------------------------

def official_schedule(oc, total: int, warmup: int) -> np.ndarray:
    "The official schedule in words: linspace(warmup_lr, lr, W), then min_lr + (lr - min_lr)(1 + cos(pi k / (T - W))) / 2, k = 0.."
    k = np.arange(total - warmup)
    cosine = oc.min_lr + 0.5 * (oc.lr - oc.min_lr) * (1 + np.cos(np.pi * k / (total - warmup)))
    return np.concatenate([np.linspace(oc.warmup_lr, oc.lr, warmup), cosine])


# iterations per epoch at the global batch 320: CUHK-PEDES 68,126 pairs, ICFG-PEDES 34,674, RSTPReid 37,010; and 10
@pytest.mark.parametrize("per_epoch", [212, 108, 115, 10])
def test_schedule_is_the_official_over_a_whole_run(per_epoch):
    oc, total, warmup = OptimConfig(), 5 * per_epoch, per_epoch
    ours = np.array([lr_at(s, total, warmup, oc) for s in range(total)])
    ref = official_schedule(oc, total, warmup)
    assert np.abs(ours - ref).max() < 1e-12 and np.abs(ours / ref - 1).max() < 1e-9
    assert ours[warmup - 1] == oc.lr and ours[0] == oc.warmup_lr  # lr is reached at the last warm-up step
    assert ours[-1] > oc.min_lr  # the cosine's last step is one step short of min_lr


def test_training_sets_the_official_schedule_on_every_group(toy, tmp_path):
    "Every step of a run: each group's lr is the official schedule's value times its head multiple."
    class Record(Callback):
        def __init__(self): self.lrs = []
        def before_batch(self, t): self.lrs.append([(g["lr"], g["lr_mult"]) for g in t.opt.param_groups])
    rec = Record()
    cfg = make_config("irra", micro_overrides(toy, tmp_path, **{"optim.lr": 1e-4, "optim.head_lr_mult": 5.0}))
    out = train(cfg, progress=False, callbacks=[rec])
    per_epoch = 48 // 8  # the toy set: 8 training identities x 3 images x 2 captions, batch 8
    ref = official_schedule(cfg.optim, out["steps"], per_epoch)
    assert len(rec.lrs) == out["steps"] == 2 * per_epoch
    for step, groups in enumerate(rec.lrs):
        assert {m for _, m in groups} == {1.0, 5.0}
        assert all(abs(lr - ref[step] * m) < 1e-12 for lr, m in groups)


# ---- 4. the interpolation of the training images -----------------------------------------------------------

def _resizes(tf) -> list:
    "The interpolation of the transform's first step, the resize of the PIL image."
    first = tf.transforms[0]
    assert isinstance(first, (T.Resize, T.RandomResizedCrop))
    return [first.interpolation]


@pytest.mark.parametrize("policy", ["none", "pool", "stack", "rrc", "erase", "randaugment"])
def test_training_transforms_resize_bilinearly_as_the_official(policy):
    cfg = make_config("tbps", {"aug.image": policy})
    assert _resizes(image_transform(cfg, (32, 16))) == [InterpolationMode.BILINEAR]
    assert _resizes(simclr_transform(cfg, (32, 16))) == [InterpolationMode.BILINEAR]
    bicubic = make_config("tbps", {"aug.image": policy, "data.train_interpolation": "bicubic"})
    assert _resizes(image_transform(bicubic, (32, 16))) == _resizes(simclr_transform(bicubic, (32, 16))) == [InterpolationMode.BICUBIC]
    assert _resizes(eval_transform((32, 16))) == [InterpolationMode.BICUBIC]  # the test transform stays bicubic


def test_training_resize_values_and_a_bad_interpolation():
    torch.manual_seed(0)
    img = T.ToPILImage()(torch.rand(3, 40, 20))
    cfg = make_config("tbps", {"aug.image": "none", "data.normalize": "imagenet"})
    want = T.Normalize(*NORMALIZE["imagenet"])(T.ToTensor()(img.resize((16, 32), Image.BILINEAR)))
    assert torch.allclose(image_transform(cfg, (32, 16))(img), want, atol=1e-6)
    cfg.data.train_interpolation = "nearest"
    with pytest.raises(TBPSError, match="data.train_interpolation='nearest': choose bilinear or bicubic"):
        image_transform(cfg, (32, 16))


# ---- 5. (and 6) the optimiser's groups ---------------------------------------------------------------------

OFFICIAL_HEAD_NAMES = {"heads.classifier.": "classifier.", "heads.mlm.cross_attn.": "cross_attn.",
                       "heads.mlm.transformer.": "cross_modal_transformer.", "heads.mlm.head.": "mlm_head.",
                       "heads.mlm.": "", "heads.ss_image.": "simclr_mlp."}


def official_name(n: str) -> str:
    "This project's parameter name as the official model names it."
    for ours, theirs in OFFICIAL_HEAD_NAMES.items():
        if n.startswith(ours): return theirs + n[len(ours):]
    n = n.removeprefix("clip.")
    return n if n.startswith("visual.") or n == "logit_scale" else "encode_text." + n


def test_optimiser_groups_follow_the_official_rules():
    "Official: lr x 5 for names with cross, classifier or mlm_head; no decay for ndim < 2 or names with bias, ln, bn."
    cfg = make_config("irra", {"loss.ss_i": 0.4})
    m = attach_heads(create_model("tbps-micro"), cfg, 5)
    ours = {id(p): (g["lr_mult"], g["weight_decay"]) for g in param_groups(m, 0.02, 5.0) for p in g["params"]}
    names = dict(m.named_parameters())
    assert {n.split(".")[2] for n in names if n.startswith("heads.mlm.") and ours[id(names[n])][0] == 1.0} == \
        {"ln_pre_t", "ln_pre_i", "ln_post"}  # the layer norms of the MLM head keep the base lr
    for n, p in names.items():
        o = official_name(n)
        mult = 5.0 if any(k in o for k in ("cross", "classifier", "mlm_head")) else 1.0
        decay = 0.0 if p.ndim < 2 or any(k in o for k in ("bias", "ln", "bn")) else 0.02
        assert ours[id(p)] == (mult, decay), (n, o)
    # the token and positional embeddings are matrices: decayed in both codes
    assert ours[id(m.clip.token_embedding.weight)][1] == ours[id(m.clip.positional_embedding)][1] == 0.02


# ---- the augmentation the official code applies ------------------------------------------------------------

def test_pool_is_the_officials_six_operations_between_to_tensor_and_normalize():
    "Official: resize, to tensor, two of jitter .1, rotation 15, RRC (0.9, 1), grayscale .1, h-flip, erasing (.1, .2), normalise."
    cfg = make_config("tbps", {"aug.pool_replace": True, "data.normalize": "imagenet"})
    tf = image_transform(cfg, (224, 224))
    resize, to_tensor, pool, norm = tf.transforms
    assert isinstance(resize, T.Resize) and isinstance(to_tensor, T.ToTensor) and isinstance(norm, T.Normalize)
    assert (tuple(norm.mean), tuple(norm.std)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert isinstance(pool, Pool) and pool.k == 2 and pool.replace and len(pool.ops) == len(KEPT_OPS) == 6
    ops = dict(zip(KEPT_OPS, pool.ops))
    assert ops["jitter"].brightness == ops["jitter"].contrast == ops["jitter"].saturation == (0.9, 1.1) and ops["jitter"].hue is None
    assert ops["rotate"].degrees == [-15.0, 15.0]
    rrc = ops["rrc"]
    assert (rrc.size, rrc.scale, rrc.ratio, rrc.interpolation) == ((224, 224), (0.9, 1.0), (0.75, 4 / 3), InterpolationMode.BILINEAR)
    assert ops["gray"].p == 0.1 and ops["hflip"].p == 0.5
    er = ops["erase"]
    assert (er.p, er.scale, er.ratio, er.value) == (0.5, (0.10, 0.20), (0.3, 3.3), 0.0)
    torch.manual_seed(0)
    draws = [tuple(pool.draw()) for _ in range(400)]
    assert any(a == b for a, b in draws) and len(set(draws)) == 36  # with replacement: all 6 x 6 ordered pairs


def test_simclr_views_are_the_officials():
    "Official: RRC (0.2, 1), jitter (.4, .4, .4, .1) p .8, grayscale p .2, blur sigma .1-2 p .5, h-flip, to tensor, normalise."
    tf = simclr_transform(make_config("tbps"), (224, 224))
    rrc, jit, gray, blur, flip, to_tensor, norm = tf.transforms
    assert rrc.scale == (0.2, 1.0) and rrc.size == (224, 224)
    assert jit.p == 0.8 and jit.transforms[0].brightness == (0.6, 1.4) and jit.transforms[0].hue == (-0.1, 0.1)
    assert gray.p == 0.2 and blur.p == 0.5 and isinstance(blur.transforms[0], PILGaussianBlur)
    assert blur.transforms[0].sigma == (0.1, 2.0) and flip.p == 0.5
    assert isinstance(to_tensor, T.ToTensor) and isinstance(norm, T.Normalize)


# ---- the tricks that act on the model ----------------------------------------------------------------------

def test_clip_star_drops_text_attention_and_locks_only_the_patch_embedding(toy, tmp_path):
    "CLIP*: dropout 0.05 on every text self-attention, none in the image tower; only conv1 is frozen."
    m = prepare_model(make_config("clip_star", micro_overrides(toy, tmp_path)))
    assert [b.attn.dropout for b in text_blocks(m)] == [0.05] * len(text_blocks(m))
    assert all(b.attn.dropout == 0.0 for b in image_blocks(m))
    assert [n for n, p in m.named_parameters() if not p.requires_grad] == ["clip.visual.conv1.weight"]


# ---- MVS-I -------------------------------------------------------------------------------------------------

def test_mvs_i_with_nitc_is_the_official_average_over_two_image_views():
    "Official: N-ITC averaged over (I, T) and (I~, T); the tbps preset's 0.5 + 0.5."
    torch.manual_seed(0)
    img, aug, txt = (F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1) for _ in range(3))
    pids = torch.tensor([0, 1, 0, 2, 1, 3])
    w = {"nitc": 0.5, "mvs_i": 0.5}
    out = dict(image_feats=img, image_aug_feats=aug, text_feats=txt, logit_scale=torch.tensor(20.0, dtype=torch.float64))
    got = compute_losses(out, {"pid": pids}, w, LossContext(cfg=LossConfig()))["loss"]
    assert float(got) == pytest.approx(float((nitc(img, txt, 20.0, pids) + nitc(aug, txt, 20.0, pids)) / 2), rel=1e-12)
    lc = make_config("tbps").loss
    assert (lc.nitc, lc.mvs_i) == (0.5, 0.5)


# ---- captions and tokens -----------------------------------------------------------------------------------

def test_captions_are_cleaned_and_tokenised_as_the_officials():
    "Official: lower-case, . ! \" ( ) * # : ; ~ become spaces, whitespace collapsed, 77 words; SOT + BPE + EOT, EOT kept."
    assert clean_caption('A Man; wears "RED" (shirt)*#~:  and.shoes!') == "a man wears red shirt and shoes"
    assert clean_caption(" ".join(f"w{i}" for i in range(100))).split() == [f"w{i}" for i in range(77)]
    tok = tokenize(["a man", " ".join(["red"] * 100)], 77)
    assert tok[0, 0] == SOT_TOKEN and tok[0, 3] == EOT_TOKEN and not tok[0, 4:].any()
    assert tok[1, 0] == SOT_TOKEN and tok[1, -1] == EOT_TOKEN and (tok[1, 1:-1] == tok[1, 1]).all()  # truncated, EOT kept


def test_back_translation_comes_before_random_deletion():
    "Official order per caption: BT (p 0.1) replaces the caption, then RD (p 0.05) drops words of the result."
    aug = CaptionAugmenter(AugConfig(bt=1.0, rd=0.5))
    bt = "someone wearing a crimson top and dark jeans"
    for s in range(50):
        out = aug("a man in a red shirt", bt, random.Random(s)).split()
        it = iter(bt.split())
        assert out and all(w in it for w in out)  # a non-empty subsequence of the back-translation


# ---- the presets and defaults the paper and the official code use -----------------------------------------

def test_presets_and_defaults_carry_the_official_settings():
    sp, tb = make_config("simplified"), make_config("tbps")
    for c in (sp, tb):  # CLIP* + augmentation pool + BT + RD
        assert (c.trick.global_grad, c.trick.text_dropout, c.trick.lock_patch_embed, c.trick.soft_label) == (True, 0.05, True, 0.5)
        assert (c.trick.soft_label_warmup, c.trick.soft_label_source) == (1.0, "nograd")
        assert (c.aug.image, c.aug.pool_k, c.aug.bt, c.aug.rd) == ("pool", 2, 0.1, 0.05)
    assert (sp.loss.itc, sp.loss.nitc, sp.loss.ritc, sp.loss.ritc_eps) == (0.0, 1.0, 1.0, 0.01)
    lc = tb.loss  # N-ITC 1.0 as (I, T) + (I~, T) halves, SS-I 0.4 (tau 0.1), R-ITC 1.0, C-ITC 0.1 x (0.25 + 0.25)
    assert (lc.nitc, lc.mvs_i, lc.ss_i, lc.ss_tau, lc.ritc, lc.citc, lc.citc_inmodal, lc.citc_crossmodal) == \
        (0.5, 0.5, 0.4, 0.1, 1.0, 0.1, 0.25, 0.25)
    ss = attach_heads(create_model("ViT-B-16", device="meta"), tb, 10).heads["ss_image"]
    assert [(l.in_features, l.out_features) for l in ss if isinstance(l, torch.nn.Linear)] == [(512, 128), (128, 512)]
    oc = OptimConfig()
    assert (oc.lr, oc.warmup_lr, oc.min_lr, oc.warmup_epochs, oc.weight_decay, oc.betas, oc.eps, oc.head_lr_mult) == \
        (1e-4, 1e-6, 5e-6, 1.0, 0.02, (0.9, 0.98), 1e-8, 5.0)
    assert make_config("clip").train.epochs == 5 and make_config("clip").data.max_words == 77


def test_operations_outside_the_pool_have_the_appendix_settings():
    "Blur kernel 3 sigma 0.1-2, hue 0.1, vertical flip p 0.5 (the appendix); not in the official code's pool."
    cfg = make_config("clip_star")
    ops = {name: image_transform(cfg, (32, 16), name).transforms[2] for name in ("blur", "hue", "vflip")}
    assert ops["blur"].kernel_size == (3, 3) and ops["blur"].sigma == (0.1, 2.0)
    assert ops["hue"].hue == (-0.1, 0.1) and ops["hue"].brightness is None and ops["vflip"].p == 0.5
