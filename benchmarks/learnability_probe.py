"""Which tower of the small CLIP learns slowly on SynthPEDES? (synthetic; a diagnostic, not a benchmark of speed)

A minimal in-memory ITC loop (identity-aware targets, AdamW, 20-step warm-up + cosine) trains tbps-tiny from random
weights for a fixed number of steps and prints val R@1, with one part swapped per run: the text tower for a
bag-of-words encoder (`text=bow`), the image tower for a small CNN (`image=cnn`), other ViT settings (`vcfg`),
stronger positional embeddings (`pos_scale`), another learning rate or fixed logit scale, or another dataset folder
(env DATA, cached tensors tagged by env TAG), on env DEV (cpu | cuda), with val R@1 every `eval_every` steps
(the learning curve) when given. Usage:
  DATA=~/.cache/tbps_clip/synthpedes/v2-default python benchmarks/learnability_probe.py '{"name":"base","lr":1e-3}' ...
Rows are appended to benchmarks/results/learnability_probe.jsonl."""
import sys, json, time, math, os
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
from tbps_clip.model import create_model
from tbps_clip.text import tokenize, clean_caption
from tbps_clip.metrics import rank_metrics
torch.set_num_threads(int(os.environ.get("T", "1")))
DEV = torch.device(os.environ.get("DEV", "cpu"))
OUTFILE = os.environ.get("OUTFILE") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "learnability_probe.jsonl")
R = os.path.expanduser(os.environ.get("DATA", "~/.cache/tbps_clip/synthpedes/v2-default")); TAG = os.environ.get("TAG", "")
CACHE = os.environ.get("PROBE_CACHE", "/tmp/learnability_probe"); os.makedirs(CACHE, exist_ok=True)
ann = json.load(open(f"{R}/annotations.json"))["records"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1); STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
def load(split, cache={}):
    if split in cache: return cache[split]
    if os.path.exists(f"{CACHE}/{TAG}{split}.pt"):
        cache[split] = tuple(x.to(DEV) for x in torch.load(f"{CACHE}/{TAG}{split}.pt")); return cache[split]
    recs = [r for r in ann if r["split"] == split]
    ims = torch.from_numpy(np.stack([np.asarray(Image.open(f"{R}/images/{r['image']}").convert("RGB")) for r in recs])).permute(0, 3, 1, 2).float() / 255
    ims = (ims - MEAN) / STD
    caps = [(i, c) for i, r in enumerate(recs) for c in r["captions"]]
    toks = tokenize([clean_caption(c) for _, c in caps], 64)
    out = (ims, torch.tensor([r["pid"] for r in recs]), toks, torch.tensor([i for i, _ in caps]))
    torch.save(out, f'{CACHE}/{TAG}{split}.pt')
    cache[split] = out = tuple(x.to(DEV) for x in out); return out
def evaluate(m, split="val", enc_i=None, enc_t=None):
    enc_i, enc_t = enc_i or m.encode_image, enc_t or m.encode_text
    ims, pids, toks, img_of = load(split)
    m.eval()
    with torch.no_grad():
        fi = torch.cat([enc_i(ims[i:i+256]) for i in range(0, len(ims), 256)])
        ft = torch.cat([enc_t(toks[i:i+256]) for i in range(0, len(toks), 256)])
    m.train()
    met = rank_metrics(ft, fi, pids[img_of], pids)
    return round(float(met["R@1"]), 2)
class BOW(torch.nn.Module):
    def __init__(s, d=128): super().__init__(); s.e = torch.nn.EmbeddingBag(49408, 256, mode="mean", padding_idx=0); s.p = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, d))
    def forward(s, t): return F.normalize(s.p(s.e(t)), dim=-1)
class CNN(torch.nn.Module):
    def __init__(s, d=128):
        super().__init__(); c = lambda i, o: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, 2, 1), torch.nn.BatchNorm2d(o), torch.nn.GELU())
        s.f = torch.nn.Sequential(c(3, 32), c(32, 64), c(64, 128), c(128, 128)); s.p = torch.nn.Linear(128 * 8 * 4, d)
    def forward(s, x): return F.normalize(s.p(s.f(x).flatten(1)), dim=-1)
def run(name, arch="tbps-tiny", lr=1e-3, steps=150, bs=64, scale=None, init=None, wd=0.02, seed=0, text=None, image=None, vcfg=None, pos_scale=None, eval_every=0):
    torch.manual_seed(seed)
    if vcfg:
        import copy, open_clip.factory as fac
        from tbps_clip.model import ARCHS
        c = copy.deepcopy(ARCHS["tbps-tiny"]); c["vision_cfg"].update(vcfg); arch = "diag-" + name
        ARCHS[arch] = c; fac._MODEL_CONFIGS[arch] = c
    m = create_model(arch)
    if vcfg and "image_size" in vcfg:
        global load
        ims, pids, toks, img_of = load("train"); h, w = vcfg["image_size"]
        rs = lambda x: F.interpolate(x, size=(h, w), mode="area")
        for sp in ("train", "val"):
            a = load(sp); load.__defaults__[0][sp] = (rs(a[0]),) + tuple(a[1:])
    enc_t, enc_i = m.encode_text, m.encode_image
    if pos_scale:
        with torch.no_grad(): m.clip.visual.positional_embedding.mul_(pos_scale)
    if text == "bow": m.bow = BOW(); enc_t = m.bow
    if image == "cnn": m.cnn = CNN(); enc_i = m.cnn
    if init: m.load_state_dict(torch.load(os.path.expanduser(init), weights_only=True, map_location="cpu")["model"])
    m.to(DEV)
    if scale: 
        with torch.no_grad(): m.clip.logit_scale.fill_(math.log(scale))
        m.clip.logit_scale.requires_grad_(False)
    ims, pids, toks, img_of = load("train")
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.98), weight_decay=wd)
    g = torch.Generator().manual_seed(seed); t0 = time.time(); losses = []; curve = []
    for step in range(steps):
        for pg in opt.param_groups: pg["lr"] = lr * min(1, (step + 1) / 20) * (0.5 + 0.5 * math.cos(math.pi * step / steps))
        # one caption per sampled image, distinct images in the batch
        ci = torch.randint(len(toks), (bs,), generator=g).to(DEV)
        ii = img_of[ci]
        fi, ft = enc_i(ims[ii]), enc_t(toks[ci])
        s = m.logit_scale
        lg = s * ft @ fi.t()
        same = (pids[ii][:, None] == pids[ii][None]).float(); tgt = same / same.sum(1, keepdim=True)
        loss = 0.5 * (-(tgt * F.log_softmax(lg, 1)).sum(1).mean() - (tgt * F.log_softmax(lg.t(), 1)).sum(1).mean())
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.detach())  # no per-step device sync
        if step % 25 == 24 and DEV.type == "cpu": print(name, step + 1, round(float(torch.stack(losses[-25:]).mean()), 3), round(time.time() - t0), flush=True)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            curve.append((step + 1, evaluate(m, enc_i=enc_i, enc_t=enc_t))); print(name, "step", step + 1, "val R@1", curve[-1][1], flush=True)
    losses = torch.stack(losses).float().cpu().numpy()
    row = dict(name=name, pos_scale=pos_scale, data=TAG, vcfg=vcfg, text=text, image=image, steps=steps, lr=lr, scale=scale, arch=arch, s=round(time.time() - t0), loss=[round(float(np.mean(losses[i:i+25])), 2) for i in range(0, steps, 25)], val_R1=evaluate(m, enc_i=enc_i, enc_t=enc_t), logit_scale=round(float(m.logit_scale.detach()), 1),
               curve=curve, init=init, wd=wd, bs=bs, device=str(DEV))
    print(json.dumps(row), flush=True); open(OUTFILE, "a").write(json.dumps(row) + "\n")
    return m
if __name__ == "__main__":
    for spec in sys.argv[1:]:
        kw = json.loads(spec); run(**kw)
