"""Each loss against a direct, loop-by-loop transcription of its formula on small inputs, plus properties."""
import math

import pytest
import torch
import torch.nn.functional as F

from tbps_clip.config import LossConfig, make_config
from tbps_clip.core import TBPSError
from tbps_clip.losses import (Gather, LossContext, LOSSES, Soft, citc, compute_losses, id_loss, itc, itc_soft,
                              loss_weights, mlm_loss, nitc, nt_xent, ritc, sdm)

torch.manual_seed(0)
B, D = 6, 8
IMG = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
TXT = F.normalize(IMG + 0.7 * torch.randn(B, D, dtype=torch.float64), dim=-1)
PIDS = torch.tensor([0, 1, 0, 2, 1, 3])
SCALE = 20.0


def dot(a, b): return sum(float(x) * float(y) for x, y in zip(a, b))


def softmax_row(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def q_row(i, pids):
    same = [1.0 if pids[i] == pids[j] else 0.0 for j in range(len(pids))]
    return [v / sum(same) for v in same]


def ce_rows(img, txt, scale, targets):
    "Symmetric soft cross-entropy, written with plain loops; targets(i, direction) -> list."
    n = len(img)
    tot = 0.0
    for direction, (rows, cols) in enumerate(((img, txt), (txt, img))):
        for i in range(n):
            p = softmax_row([scale * dot(rows[i], cols[j]) for j in range(n)])
            t = targets(i, direction)
            tot += -sum(t[j] * math.log(p[j]) for j in range(n)) / n
    return tot / 2


def test_itc_matches_formula():
    want = ce_rows(IMG, TXT, SCALE, lambda i, d: [1.0 if j == i else 0.0 for j in range(B)])
    assert float(itc(IMG, TXT, SCALE)) == pytest.approx(want, rel=1e-9)


def test_nitc_matches_formula_and_equals_itc_when_pids_differ():
    want = ce_rows(IMG, TXT, SCALE, lambda i, d: q_row(i, PIDS.tolist()))
    assert float(nitc(IMG, TXT, SCALE, PIDS)) == pytest.approx(want, rel=1e-9)
    distinct = torch.arange(B)
    assert float(nitc(IMG, TXT, SCALE, distinct)) == pytest.approx(float(itc(IMG, TXT, SCALE)), rel=1e-12)
    assert float(nitc(IMG, TXT, SCALE, PIDS)) != pytest.approx(float(itc(IMG, TXT, SCALE)), rel=1e-3)


def test_soft_labels_match_formula_and_alpha_zero_is_hard():
    ng_i = F.normalize(IMG + 0.3 * torch.randn(B, D, dtype=torch.float64), dim=-1)
    ng_t = F.normalize(TXT + 0.3 * torch.randn(B, D, dtype=torch.float64), dim=-1)
    alpha = 0.3

    def targets(i, d, hard):
        rows, cols = (ng_i, ng_t) if d == 0 else (ng_t, ng_i)
        p = softmax_row([SCALE * dot(rows[i], cols[j]) for j in range(B)])
        return [alpha * p[j] + (1 - alpha) * hard(i)[j] for j in range(B)]

    onehot = lambda i: [1.0 if j == i else 0.0 for j in range(B)]
    want = ce_rows(IMG, TXT, SCALE, lambda i, d: targets(i, d, onehot))
    assert float(itc_soft(IMG, TXT, SCALE, soft=Soft(alpha, ng_i, ng_t))) == pytest.approx(want, rel=1e-9)
    want_n = ce_rows(IMG, TXT, SCALE, lambda i, d: targets(i, d, lambda i: q_row(i, PIDS.tolist())))
    assert float(nitc(IMG, TXT, SCALE, PIDS, soft=Soft(alpha, ng_i, ng_t))) == pytest.approx(want_n, rel=1e-9)
    # alpha 0: exactly the hard-label losses
    assert float(itc_soft(IMG, TXT, SCALE, soft=Soft(0.0, ng_i, ng_t))) == pytest.approx(float(itc(IMG, TXT, SCALE)), rel=1e-12)
    assert float(nitc(IMG, TXT, SCALE, PIDS, soft=Soft(0.0, ng_i, ng_t))) == pytest.approx(float(nitc(IMG, TXT, SCALE, PIDS)), rel=1e-12)


def kl_rows(img, txt, scale, eps, pids):
    "Sum over both directions of the mean-over-rows KL(p || q + eps)."
    out = []
    for rows, cols in ((img, txt), (txt, img)):
        tot = 0.0
        for i in range(B):
            p = softmax_row([scale * dot(rows[i], cols[j]) for j in range(B)])
            q = q_row(i, pids)
            tot += sum(p[j] * (math.log(p[j]) - math.log(q[j] + eps)) for j in range(B)) / B
        out.append(tot)
    return out


def test_ritc_matches_formula():
    kl_i, kl_t = kl_rows(IMG, TXT, SCALE, 0.01, PIDS.tolist())
    assert float(ritc(IMG, TXT, SCALE, PIDS, eps=0.01)) == pytest.approx(0.5 * (kl_i + kl_t), rel=1e-9)


def test_sdm_matches_formula():
    kl_i, kl_t = kl_rows(IMG, TXT, 1 / 0.02, 1e-8, PIDS.tolist())
    assert float(sdm(IMG, TXT, PIDS, tau=0.02)) == pytest.approx(kl_i + kl_t, rel=1e-9)


def test_citc_matches_formula():
    s = lambda a, b: [[dot(a[i], b[j]) for j in range(B)] for i in range(B)]
    sii, stt, sit, sti = s(IMG, IMG), s(TXT, TXT), s(IMG, TXT), s(TXT, IMG)
    inm = sum((sii[i][j] - stt[i][j]) ** 2 for i in range(B) for j in range(B)) / B ** 2
    crs = sum((sit[i][j] - sti[i][j]) ** 2 for i in range(B) for j in range(B)) / B ** 2
    assert float(citc(IMG, TXT, inmodal=0.25, crossmodal=0.75)) == pytest.approx(0.25 * inm + 0.75 * crs, rel=1e-9)
    assert float(citc(IMG, IMG)) == 0.0


def test_nt_xent_matches_formula():
    za, zb = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    a, b = F.normalize(za, dim=-1), F.normalize(zb, dim=-1)
    tau = 0.1
    tot = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(B):
            # positive: y_i; negatives: every y_j (j != i) and x_j (j != i)
            logits = [dot(x[i], y[j]) / tau for j in range(B)] + [dot(x[i], x[j]) / tau for j in range(B) if j != i]
            tot += -math.log(softmax_row(logits)[i]) / B
    assert float(nt_xent(za, zb, tau)) == pytest.approx(tot / 2, rel=1e-9)


def test_id_and_mlm_match_formula():
    li, lt = torch.randn(B, 4, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64)
    pids = torch.tensor([0, 1, 2, 3, 0, 1])
    nll = lambda row, k: -math.log(softmax_row(row.tolist())[k])
    want = (sum(nll(li[i], pids[i]) for i in range(B)) / B + sum(nll(lt[i], pids[i]) for i in range(B)) / B) / 2
    assert float(id_loss(li, lt, pids)) == pytest.approx(want, rel=1e-6)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[0, 3], labels[1, 4] = 2, 6, 0
    want = (nll(logits[0, 1], 2) + nll(logits[0, 3], 6) + nll(logits[1, 4], 0)) / 3
    assert float(mlm_loss(logits, labels)) == pytest.approx(want, rel=1e-6)


def test_gathered_columns_use_the_offset():
    "A fake 2-process gather: rank 1's rows are matched against columns B..2B-1."
    other = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=-1)
    g = Gather(fn=lambda x: torch.cat([other if x.dtype.is_floating_point else x, x]), rank=1)
    full = itc(torch.cat([other, IMG]), torch.cat([other, TXT]), SCALE)
    # local rows x gathered columns, rank 1: equals the rows B..2B-1 of the full-batch loss
    i2t = SCALE * torch.cat([other, IMG]) @ torch.cat([other, TXT]).t()
    t2i = SCALE * torch.cat([other, TXT]) @ torch.cat([other, IMG]).t()
    lab = torch.arange(2 * B)
    want = (F.cross_entropy(i2t[B:], lab[B:]) + F.cross_entropy(t2i[B:], lab[B:])) / 2
    assert float(itc(IMG, TXT, SCALE, g)) == pytest.approx(float(want), rel=1e-9)
    assert float(full) != pytest.approx(float(want), rel=1e-3)


def test_weights_and_presets():
    assert loss_weights(make_config("tbps").loss) == {"nitc": 0.5, "ritc": 1.0, "citc": 0.1, "ss_i": 0.4, "mvs_i": 0.5}
    assert loss_weights(make_config("simplified").loss) == {"nitc": 1.0, "ritc": 1.0}
    assert loss_weights(make_config("irra").loss) == {"id": 1.0, "mlm": 1.0, "sdm": 1.0}
    assert set(loss_weights(LossConfig(**{k: 1.0 for k in LOSSES}))) == set(LOSSES)
    with pytest.raises(TBPSError, match="nothing to train"):
        loss_weights(LossConfig(itc=0.0))


def test_combination_is_the_weighted_sum():
    out = dict(image_feats=IMG, text_feats=TXT, logit_scale=torch.tensor(SCALE, dtype=torch.float64))
    ctx = LossContext(cfg=LossConfig(ritc_eps=0.05))
    t = compute_losses(out, {"pid": PIDS}, {"nitc": 0.5, "ritc": 2.0, "citc": 0.1}, ctx)
    want = 0.5 * nitc(IMG, TXT, SCALE, PIDS) + 2.0 * ritc(IMG, TXT, SCALE, PIDS, eps=0.05) + 0.1 * citc(IMG, TXT)
    assert float(t["loss"]) == pytest.approx(float(want), rel=1e-12)
