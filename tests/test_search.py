"""Gallery search (tbps_clip.search and the index/search commands): equality with the evaluator, adding, bad input, sharding."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tbps_clip.fixtures import make_toy_dataset
from tbps_clip.checkpoint import save_checkpoint
from tbps_clip.cli import main
from tbps_clip.config import make_config
from tbps_clip.core import TBPSError
from tbps_clip.model import create_model
from tbps_clip.annotations import read_annotations
from tbps_clip.run import evaluate_checkpoint
from tbps_clip.search import Encoder, GalleryIndex, topk_search

ROOT = Path(__file__).resolve().parents[1]


def micro_checkpoint(path, ann_path=None, seed=0):
    "A randomly initialised tbps-micro model saved as a project checkpoint with its config."
    torch.manual_seed(seed)
    ov = {"model.arch": "tbps-micro", "model.pretrained": "none", "data.image_size": "[32,16]", "train.device": "cpu",
          "data.eval_batch_size": 16}
    if ann_path: ov.update({"data.dataset": "annotations", "data.annotations": str(ann_path)})
    cfg = make_config("clip", ov)
    save_checkpoint(path, create_model("tbps-micro", (32, 16)), cfg)
    return path


def run_cli(*args):
    "(exit status, stdout, stderr) of `tbps-clip ARGS`."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def indexed_toy_gallery(root, n_ids) -> dict:
    "A toy dataset under `root` with `n_ids` (train, val, test) identities, a micro checkpoint, and an index of its test images."
    ann = make_toy_dataset(root / "toy", n_ids=n_ids)
    ckpt = micro_checkpoint(root / "a.pt", ann)
    rc, _, err = run_cli("index", root / "toy/images/test", "--out", root / "idx", "--checkpoint", ckpt, "--quiet")
    assert rc == 0, err
    return dict(root=root, ann=ann, ckpt=ckpt, idx=root / "idx", images=root / "toy/images/test")


@pytest.fixture(scope="module")
def toy_gallery(tmp_path_factory):
    "A toy dataset, a checkpoint, and an index of its test images."
    return indexed_toy_gallery(tmp_path_factory.mktemp("search"), (2, 1, 6))


# ---- the CLI search agrees with the evaluator --------------------------------------------------------

def test_cli_top1_accuracy_equals_evaluator_r1(tmp_path):
    from tbps_clip.synthpedes import make_synthpedes
    data = make_synthpedes(tmp_path / "synth", n_train_ids=2, n_val_ids=1, n_test_ids=12, progress=False)
    ann = read_annotations(data / "annotations.json")
    ckpt = micro_checkpoint(tmp_path / "m.pt", data / "annotations.json")
    test = ann.split("test")
    # the gallery in the evaluator's order (annotation order), so that ties break the same way
    (tmp_path / "gallery.txt").write_text("\n".join(str(ann.image_path(r)) for r in test))
    caps = [(c, r.pid) for r in test for c in r.captions]
    (tmp_path / "queries.txt").write_text("\n".join(c for c, _ in caps))
    rc, _, err = run_cli("index", tmp_path / "gallery.txt", "--out", tmp_path / "idx", "--checkpoint", ckpt, "--quiet")
    assert rc == 0, err
    rc, out, err = run_cli("search", "--index", tmp_path / "idx", "--queries-file", tmp_path / "queries.txt", "-k", 1, "--json")
    assert rc == 0, err
    lines = [json.loads(s) for s in out.splitlines()]
    pid_of = {str(ann.image_path(r)): r.pid for r in test}
    top1 = [pid_of[d["hits"][0]["file"]] for d in lines]
    assert [d["query"] for d in lines] == [c for c, _ in caps]
    acc = 100 * np.mean([p == q for p, (_, q) in zip(top1, caps)])
    r1 = evaluate_checkpoint(str(ckpt))["metrics"]["R@1"]
    assert len(lines) == len(caps) > 40
    assert 0 < r1 < 100, "a random model should be neither perfect nor useless here: the comparison would say little"
    assert acc == pytest.approx(r1, abs=1e-9)


# ---- building, adding, skipping ---------------------------------------------------------------------------

def test_index_reports_and_skips_bad_files(tmp_path):
    make_toy_dataset(tmp_path / "g", n_ids=(1, 0, 2))
    (tmp_path / "g/images/test/broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "g/images/test/readme.txt").write_text("not an image")
    micro_checkpoint(tmp_path / "m.pt")
    rc, out, err = run_cli("index", tmp_path / "g/images", "--out", tmp_path / "idx", "--checkpoint", tmp_path / "m.pt", "--quiet")
    assert rc == 0, err
    assert "indexed 9 images" in out and "skipped 2 file(s)" in out
    assert "broken.png" in out and "cannot read image" in out and "readme.txt" in out and "not an image file" in out
    idx = GalleryIndex.load(tmp_path / "idx")
    assert len(idx) == 9 and all(not p.endswith((".txt", "broken.png")) for p in idx.paths)
    assert idx.paths[0] == "test/1_0.png" and idx.paths[-1] == "train/0_2.png"  # relative to the gallery folder, which is the stored root


def test_add_encodes_only_new_images_and_keeps_old_parts(toy_gallery, tmp_path, monkeypatch):
    import shutil
    g = tmp_path / "g"
    shutil.copytree(toy_gallery["images"], g)
    assert run_cli("index", g, "--out", tmp_path / "idx", "--checkpoint", toy_gallery["ckpt"], "--quiet")[0] == 0
    first = (tmp_path / "idx/embeddings-0000.npy").read_bytes()
    before = GalleryIndex.load(tmp_path / "idx")
    Image.new("RGB", (16, 32), (200, 30, 30)).save(g / "new_a.png")
    Image.new("RGB", (16, 32), (30, 30, 200)).save(g / "sub_new_b.jpg")
    seen = []
    real = Encoder.embed_images
    monkeypatch.setattr(Encoder, "embed_images", lambda self, items, *a, **k: (seen.extend(items), real(self, items, *a, **k))[1])
    rc, out, err = run_cli("index", g, "--out", tmp_path / "idx", "--add", "--checkpoint", toy_gallery["ckpt"], "--quiet")
    assert rc == 0, err
    assert sorted(Path(p).name for p in seen) == ["new_a.png", "sub_new_b.jpg"]
    assert f"skipped {len(before)} file(s)" in out and "already in the index" in out
    after = GalleryIndex.load(tmp_path / "idx", verify=True)
    assert (tmp_path / "idx/embeddings-0000.npy").read_bytes() == first
    assert after.paths[:len(before)] == before.paths and len(after) == len(before) + 2 and len(after.parts) == 2
    # adding without --add refuses to overwrite
    rc, _, err = run_cli("index", g, "--out", tmp_path / "idx", "--checkpoint", toy_gallery["ckpt"], "--quiet")
    assert rc == 2 and "an index already exists" in err
    rc, _, err = run_cli("index", g, "--out", tmp_path / "idx", "--add", "--dtype", "float16", "--checkpoint", toy_gallery["ckpt"])
    assert rc == 2 and "the index stores float32; cannot add float16" in err


def test_in_memory_images_float16_and_paging(toy_gallery):
    enc = Encoder.from_checkpoint(toy_gallery["ckpt"])
    files = sorted(toy_gallery["images"].glob("*.png"))
    ims = [Image.open(f).convert("RGB") for f in files]
    a = GalleryIndex.build(enc, ims, names=[f.name for f in files], progress=False)
    b = GalleryIndex.build(enc, ims, dtype="float16", progress=False)
    assert a.paths[0] == "memory:" + files[0].name and b.paths[0] == "memory:0" and a.file(0) is None
    assert b.parts[0].dtype == np.float16 and np.allclose(a.parts[0], b.parts[0], atol=2e-3)
    q = "a person in a red top and blue trousers"
    full = a.search(enc, q, k=len(files))
    pages = [h for off in range(0, len(files), 5) for h in a.search(enc, q, k=5, offset=off)]
    assert [(h.rank, h.index) for h in pages] == [(h.rank, h.index) for h in full]
    assert [h.rank for h in full] == list(range(1, len(files) + 1))
    assert all(x.score >= y.score for x, y in zip(full, full[1:]))
    # the scores are the cosine similarities of the evaluator's features
    from tbps_clip.evaluate import encode_texts
    from tbps_clip.text import clean_caption
    t = encode_texts(enc.model, [clean_caption(q)])
    assert full[0].score == pytest.approx(float(t[0] @ torch.from_numpy(a.parts[0][full[0].index])), abs=1e-5)
    with pytest.raises(TBPSError, match="is empty"):
        a.search(enc, "!!! ...", k=3)


@pytest.mark.parametrize("nq, k, rows", [(1, 1, 256), (3, 7, 256), (2, 50, 300), (4, 2000, 256)])
def test_chunked_topk_equals_stable_full_sort(nq, k, rows):
    g = torch.randint(-2, 3, (1500, 6)).float()  # few distinct scores: many exact ties, also across blocks
    q = torch.randint(-1, 2, (nq, 6)).float()
    parts = [g[:700].numpy().astype(np.float16), g[700:].numpy().astype(np.float16)]
    v, i = topk_search(parts, q, k, block_rows=rows)
    ref_v, ref_i = (q @ g.t()).sort(dim=1, descending=True, stable=True)
    assert torch.equal(i, ref_i[:, :k]) and torch.equal(v, ref_v[:, :k])


# ---- refusals -----------------------------------------------------------------------------------------------

def test_index_from_another_model_is_refused(toy_gallery, tmp_path):
    other = micro_checkpoint(tmp_path / "b.pt", seed=1)
    rc, out, err = run_cli("search", "a person in red", "--index", toy_gallery["idx"], "--checkpoint", other)
    assert rc == 2 and "built by a different model" in err and "weights" in err and err.count("\n") == 1
    big = tmp_path / "tiny.pt"
    cfg = make_config("clip", {"model.arch": "tbps-tiny", "model.pretrained": "none", "train.device": "cpu"})
    save_checkpoint(big, create_model("tbps-tiny"), cfg)
    rc, out, err = run_cli("search", "a person in red", "--index", toy_gallery["idx"], "--checkpoint", big)
    assert rc == 2 and "arch: index 'tbps-micro', model 'tbps-tiny'" in err
    # the default is the model the index records, which works
    rc, out, err = run_cli("search", "a person in red", "--index", toy_gallery["idx"], "-k", 3)
    assert rc == 0 and out.count("\n") == 4, err


def _copy_index(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "index.json").write_text('{"format": "tbps-clip-index", "vers'), r"index.json: corrupt index file \(not valid JSON"),
    (lambda d: (d / "index.json").write_text('{"format": "something-else"}'), r"index.json: not a tbps-clip index"),
    (lambda d: (d / "index.json").unlink(), r"index.json: missing"),
    (lambda d: (d / "embeddings-0000.npy").write_bytes((d / "embeddings-0000.npy").read_bytes()[:300]),
     r"embeddings-0000.npy: corrupt or truncated embeddings file"),
    (lambda d: (d / "embeddings-0000.npy").write_bytes(b"garbage" * 10), r"embeddings-0000.npy: corrupt or truncated"),
    (lambda d: np.save(d / "embeddings-0000.npy", np.zeros((3, 32), np.float32)), r"embeddings-0000.npy: embeddings have shape \(3, 32\)"),
    (lambda d: (d / "embeddings-0000.npy").unlink(), r"embeddings-0000.npy: embeddings file missing"),
    (lambda d: _edit(d, lambda j: j["paths"].pop()), r"'paths' must hold 18 non-empty strings \(has 17"),
    (lambda d: _edit(d, lambda j: j["parts"][0].update(file="../../etc/passwd")), r"leaves the image root"),
])
def test_corrupt_index_gives_a_clear_error(toy_gallery, tmp_path, damage, message):
    d = _copy_index(toy_gallery["idx"], tmp_path / "idx")
    damage(d)
    with pytest.raises(TBPSError, match=message):
        GalleryIndex.load(d)
    rc, out, err = run_cli("search", "a person", "--index", d)
    assert rc == 2 and err.startswith("tbps-clip: error:") and err.count("\n") == 1


def _edit(d, fn):
    j = json.loads((d / "index.json").read_text())
    fn(j)
    (d / "index.json").write_text(json.dumps(j))


def test_flipped_bytes_are_found_by_verify(toy_gallery, tmp_path):
    d = _copy_index(toy_gallery["idx"], tmp_path / "idx")
    raw = bytearray((d / "embeddings-0000.npy").read_bytes())
    raw[-5] ^= 0xFF
    (d / "embeddings-0000.npy").write_bytes(bytes(raw))
    GalleryIndex.load(d)  # the header and the size are intact: only the digest can tell
    with pytest.raises(TBPSError, match="embeddings-0000.npy: embeddings file is corrupt"):
        GalleryIndex.load(d, verify=True)


def test_relative_entries_never_leave_the_root(toy_gallery, tmp_path):
    d = _copy_index(toy_gallery["idx"], tmp_path / "idx")
    _edit(d, lambda j: j["paths"].__setitem__(0, "../../../etc/passwd"))
    idx = GalleryIndex.load(d)
    with pytest.raises(TBPSError, match="leaves the image root"):
        idx.file(0)


# ---- reports ------------------------------------------------------------------------------------------------

def test_contact_sheet_and_html_report(toy_gallery, tmp_path):
    q = 'a person in a red top <script>alert("x")</script>'
    rc, out, err = run_cli("search", q, "--index", toy_gallery["idx"], "-k", 4, "--sheet", tmp_path / "s.png",
                           "--html", tmp_path / "r.html")
    assert rc == 0, err
    ranked = [ln.split() for ln in out.splitlines()[1:5]]
    assert [int(r[0]) for r in ranked] == [1, 2, 3, 4] and all(Path(r[2]).is_file() for r in ranked)
    sheet = Image.open(tmp_path / "s.png")
    assert sheet.width >= 4 * 130 and sheet.height > 192
    page = (tmp_path / "r.html").read_text()
    assert page.count("<figure>") == 4 and "&lt;script&gt;" in page and "<script>" not in page
    assert page.count("data:image/jpeg;base64,") == 4


# ---- torchrun ------------------------------------------------------------------------------------------------

def test_torchrun_two_cpu_ranks_merge_into_the_single_process_index(toy_gallery, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tbps_clip.cli", "index", str(toy_gallery["images"]), "--out", str(tmp_path / "idx"),
           "--checkpoint", str(toy_gallery["ckpt"]), "--quiet"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "encoded by 2 ranks" in r.stdout and "indexed 18 images" in r.stdout
    two, one = GalleryIndex.load(tmp_path / "idx", verify=True), GalleryIndex.load(toy_gallery["idx"])
    assert two.paths == one.paths and len(two.parts) == 2 and [p.shape[0] for p in two.parts] == [9, 9]
    assert np.allclose(np.concatenate(two.parts), np.concatenate(one.parts), atol=1e-5)
    assert not list((tmp_path / "idx").glob(".shard-*"))


def test_index_folder_inside_the_gallery_and_links(toy_gallery, tmp_path):
    import shutil
    g = tmp_path / "g"
    shutil.copytree(toy_gallery["images"], g)
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (16, 32), "white").save(outside)
    (g / "link.png").symlink_to(outside)
    rc, out, err = run_cli("index", g, "--out", g / "my.idx", "--checkpoint", toy_gallery["ckpt"], "--quiet")
    assert rc == 0, err
    assert "skipped 0 file(s)" in out  # the index's own files are not part of the gallery
    idx = GalleryIndex.load(g / "my.idx")
    assert len(idx) == 19 and str(outside) in idx.paths  # a link leading out of the root is stored as its real path
    assert run_cli("index", g, "--out", g / "my.idx", "--add", "--checkpoint", toy_gallery["ckpt"], "--quiet")[0] == 0
    assert len(GalleryIndex.load(g / "my.idx")) == 19
