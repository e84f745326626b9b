"Tests of the SynthPEDES generator (tbps_clip.synthpedes) and the pretraining corpus (tbps_clip.pretrain_corpus); tiny sizes, a few seconds."
import itertools
import json
import re
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

import tbps_clip.pretrain_corpus as PC
import tbps_clip.synthpedes as S
from tbps_clip.synthpedes import captions as C, dataset as DS, drawing as D, identities as I
from tbps_clip.core import TBPSError
from tbps_clip.datasets import load_annotations
from tbps_clip.annotations import read_annotations

TINY = dict(n_train_ids=6, n_val_ids=2, n_test_ids=3, progress=False)


def _files(root):
    "Every file under `root`, relative path -> bytes."
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return S.make_synthpedes(tmp_path_factory.mktemp("synth") / "a", **TINY)


@pytest.fixture(scope="module")
def ann(tiny):
    return read_annotations(tiny / "annotations.json")


@pytest.fixture(scope="module")
def info(tiny):
    return json.loads((tiny / "attributes.json").read_text())


# ---- determinism ------------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files(tiny, tmp_path):
    again = S.make_synthpedes(tmp_path / "b", **TINY)
    assert _files(tiny) == _files(again)


def test_other_seed_gives_other_data(tiny, tmp_path):
    a, c = _files(tiny), _files(S.make_synthpedes(tmp_path / "c", **dict(TINY, seed=1)))
    common = [k for k in a.keys() & c.keys() if k.endswith(".jpg")]
    assert len(common) >= 30 and all(a[k] != c[k] for k in common)
    assert json.loads(a["annotations.json"])["records"] != json.loads(c["annotations.json"])["records"]


def test_identities_are_prefix_stable():
    # identity i depends on (seed, split, i) only: asking for more identities does not change the first ones
    assert I.make_identities(40, seed=3, split="test") == I.make_identities(60, seed=3, split="test")[:40]


# ---- structure --------------------------------------------------------------------------------------

def test_splits_are_disjoint_and_sized_as_requested(ann):
    assert ann.dataset == "synthpedes" and ann.meta["synthetic"] is True
    assert ann.meta["generator_version"] == S.GENERATOR_VERSION and ann.meta["n_train_ids"] == 6
    pids = {s: {r.pid for r in ann.split(s)} for s in ("train", "val", "test")}
    assert {s: len(p) for s, p in pids.items()} == {"train": 6, "val": 2, "test": 3}
    assert not (pids["train"] & pids["val"] or pids["train"] & pids["test"] or pids["val"] & pids["test"])
    per_id = defaultdict(int)
    for r in ann.entries: per_id[r.pid] += 1
    assert all(3 <= n <= 5 for n in per_id.values())
    for r in ann.entries:
        assert r.image == f"{r.split}/{r.pid}_{r.image.split('_')[1]}" and r.image.endswith(".jpg")
        assert Image.open(ann.image_path(r)).size == (64, 128)


def test_every_identity_is_seen_from_every_viewpoint(info):
    viewpoints = defaultdict(set)
    for rel, i in info["images"].items(): viewpoints[rel.split("/")[1].split("_")[0]].add(i["view"])
    assert all(v == set(I.VIEWPOINTS) for v in viewpoints.values())  # >= 3 images each, viewpoints cycle first


def test_captions_and_back_translations(ann, info):
    for r in ann.entries:
        assert len(r.captions) == 2 and len(r.captions_bt) == 2
        for c, bt in zip(r.captions, r.captions_bt):
            assert c.strip() and bt.strip() and len(c.split()) >= 4
            assert c.lower().rstrip(".") != bt.lower().rstrip(".")
        fams = info["images"][r.image]["families"]
        assert len(set(fams)) == 2  # the two captions of an image are phrased in two styles


def test_back_translation_keeps_the_content_in_another_family():
    a = dict(I.make_identities(1, seed=5)[0], upper_color="green", lower_type="jeans", lower_color="blue")
    for i in range(60):
        for fam in C.FAMILIES:
            cap, bt, keys = C.caption_pair(a, "back", np.random.default_rng(i), family=fam)
            if "upper_color" in keys: assert "green" in bt
            if "lower_color" in keys: assert "blue" in bt
            assert cap.lower().rstrip(".") != bt.lower().rstrip(".")
    with pytest.raises(TBPSError, match="unknown caption family"):
        C.caption(a, "front", np.random.default_rng(0), family="haiku")


# ---- captions only mention what the viewpoint shows ---------------------------------------------------

def test_mentions_are_visible_in_the_viewpoint(info):
    n = 0
    for rel, i in info["images"].items():
        a = info["identities"][rel.split("/")[1].split("_")[0]]
        vis = I.visible_attributes(a, i["view"])
        for keys in i["mentions"]:
            assert len(keys) >= 3 and set(keys) <= set(vis), (rel, keys)
            n += 1
    assert n >= 60


_LOGO = re.compile(r"logo|print|graphic|picture")
_GLASSES = re.compile(r"glasses|spectacles")
_BACKPACK = "backpack|rucksack|knapsack|school bag"


def test_viewpoint_dependent_details_in_caption_text():
    # the only red thing is the backpack: a caption of the front viewpoint (straps only) must never say red
    a = dict(I.make_identities(1, seed=0)[0], gender="man", hair_color="black", upper_type="t-shirt", upper_color="blue",
             upper_pattern="logo", lower_type="trousers", lower_color="black", shoes_color="white", bag="backpack",
             bag_color="red", headwear="none", headwear_color=None, glasses=True)
    seen = defaultdict(int)
    for i in range(150):
        for viewpoint in I.VIEWPOINTS:
            cap, bt, keys = C.caption_pair(a, viewpoint, np.random.default_rng(i))
            for t in (cap.lower(), bt.lower()):
                red_bag = re.search(rf"red ({_BACKPACK})|({_BACKPACK}) in red", t)
                if viewpoint == "front": assert "red" not in t, t
                if viewpoint != "front": assert not _LOGO.search(t), t
                if viewpoint == "back": assert not _GLASSES.search(t), t
                seen[viewpoint, "red bag"] += bool(red_bag)
                seen[viewpoint, "logo"] += bool(_LOGO.search(t))
                seen[viewpoint, "glasses"] += bool(_GLASSES.search(t))
    # ...while what is visible does get mentioned (so the checks above can fail)
    assert seen["back", "red bag"] > 20 and seen["side", "red bag"] > 20
    assert seen["front", "logo"] > 20 and seen["front", "glasses"] > 20 and seen["side", "glasses"] > 20


# ---- images vary, identities are confusable ---------------------------------------------------------

def test_images_of_one_identity_vary_at_pixel_level(ann):
    by = defaultdict(list)
    for r in ann.entries: by[r.pid].append(np.asarray(Image.open(ann.image_path(r)), dtype=np.float32))
    within = [np.mean([np.abs(x - y).mean() for x, y in itertools.combinations(v, 2)]) for v in by.values()]
    between = np.mean([np.abs(by[p][0] - by[q][0]).mean() for p, q in itertools.combinations(by, 2)])
    # reference: what a global 10% brightness change alone does to an image (about 10 grey levels)
    x = next(iter(by.values()))[0]
    ref = np.abs(x - np.clip(x * 1.1, 0, 255)).mean()
    assert min(within) > 2 * ref, (min(within), ref)
    # pixels do not give identity away: images of one person are nearly as far apart as images of two
    assert np.mean(within) > 0.7 * between, (np.mean(within), between)


def test_confusable_identities_are_common():
    def near_twins(ids): return np.mean([min(I.attr_distance(a, b) for b in ids if b is not a) <= 2 for a in ids])
    assert near_twins(I.make_identities(80, seed=0)) > 0.3  # p_confusable 0.4 by default
    assert near_twins(I.make_identities(80, seed=0, p_confusable=0.0)) < 0.15  # the mutation is what makes them
    ids = I.make_identities(80, seed=0)
    assert len({tuple(a[k] for k in I.ATTRIBUTES) for a in ids}) == 80  # but never identical
    assert all(I._valid(a) for a in ids)


def test_mutation_changes_one_or_two_attributes():
    rng = np.random.default_rng(0)
    for _ in range(100):
        p = I.sample_identity(rng)
        m = I.mutate_identity(p, rng)
        assert m is None or 1 <= I.attr_distance(p, m) <= 2


# ---- the output folder: reuse, interruption, mismatch ------------------------------------------------

def test_complete_dataset_is_reused(tiny):
    before = (tiny / "annotations.json").stat().st_mtime_ns
    assert S.make_synthpedes(tiny, **TINY) == tiny
    assert (tiny / "annotations.json").stat().st_mtime_ns == before


def test_interrupted_generation_is_regenerated(tiny, tmp_path, monkeypatch):
    out = tmp_path / "d"
    def boom(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(DS, "write_annotations", boom)
    with pytest.raises(KeyboardInterrupt):
        S.make_synthpedes(out, **TINY)
    assert not (out / "annotations.json").exists() and (out / DS._MARKER).exists()
    monkeypatch.undo()
    S.make_synthpedes(out, **TINY)
    assert _files(out) == _files(tiny) and not (out / DS._MARKER).exists()


def test_concurrent_generations_of_one_folder_both_succeed(tiny, tmp_path):
    "Two processes asking for the same missing dataset (two runs on a fresh machine): one generates, the other waits."
    import subprocess, sys
    out = tmp_path / "shared"
    code = f"import tbps_clip.synthpedes as S; S.make_synthpedes({str(out)!r}, n_train_ids=6, n_val_ids=2, n_test_ids=3, progress=False)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errs = [p.communicate()[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    assert _files(out) == _files(tiny) and not (out / DS._MARKER).exists()


def test_missing_image_is_regenerated(tiny, tmp_path):
    out = S.make_synthpedes(tmp_path / "e", **TINY)
    (out / "images" / "test" / "9_0.jpg").unlink()
    S.make_synthpedes(out, **TINY)
    assert _files(out) == _files(tiny)


def test_different_dataset_is_refused_unless_overwrite(tmp_path):
    out = S.make_synthpedes(tmp_path / "f", **TINY)
    with pytest.raises(TBPSError, match=r"n_train_ids: 6 there, 7 requested"):
        S.make_synthpedes(out, **dict(TINY, n_train_ids=7))
    S.make_synthpedes(out, **dict(TINY, n_train_ids=7), overwrite=True)
    a = read_annotations(out / "annotations.json")
    assert a.summary()["train"]["ids"] == 7 and a.meta["n_train_ids"] == 7
    assert {p.name.split("_")[0] for p in (out / "images" / "test").iterdir()} == {"10", "11", "12"}  # old test files gone


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(TBPSError, match="refusing to write SynthPEDES here"):
            S.make_synthpedes(tmp_path / "g", **TINY, overwrite=overwrite)
    assert (tmp_path / "g" / "notes.txt").read_text() == "mine"


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(TBPSError, match="images_per_id"):
        S.make_synthpedes(tmp_path / "h", **dict(TINY, images_per_id=(4, 2)))


# ---- the reader and the default dataset ------------------------------------------------------------

def test_reader_reads_a_folder_and_refuses_one_without_annotations(tiny, tmp_path):
    assert load_annotations("synthpedes", root=str(tiny)).summary()["test"]["ids"] == 3
    with pytest.raises(TBPSError, match=r"annotations.json is missing.*tbps-clip synth --out"):
        S.read_synthpedes(str(tmp_path / "nothing"))


def test_ensure_generates_once_in_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TBPS_CLIP_CACHE", str(tmp_path / "cache"))
    assert S.default_synthpedes_root() == tmp_path / "cache" / "synthpedes" / f"v{S.GENERATOR_VERSION}-default"
    sizes = dict(n_train_ids=2, n_val_ids=1, n_test_ids=1)
    root = S.ensure_synthpedes(progress=False, **sizes)
    assert root.parent == tmp_path / "cache" / "synthpedes" and root != S.default_synthpedes_root()
    assert capsys.readouterr().out.count("Generating SynthPEDES") == 1
    a = S.read_synthpedes("", progress=False, **sizes)
    assert capsys.readouterr().out == "" and a.summary()["train"]["ids"] == 2
    with pytest.raises(TBPSError, match="unknown setting"):
        S.ensure_synthpedes(n_people=3)


# ---- pretraining corpus ----------------------------------------------------------------------------

def test_pretrain_corpus_is_deterministic_and_web_like():
    c = PC.PretrainCorpus(12, seed=0)
    assert len(c) == 12
    im, cap = c[5]
    im2, cap2 = PC.pretrain_item(5, seed=0)
    assert cap == cap2 and np.array_equal(np.asarray(im), np.asarray(im2)) and im.size == (64, 128)
    assert c[-1][1] == c[11][1]
    with pytest.raises(IndexError): c[12]
    caps = [PC.pretrain_item(i)[1] for i in range(80)]
    assert max(len(x.split()) for x in caps) <= 14 and np.mean([len(x.split()) for x in caps]) < 9  # short
    assert len(set(caps)) > 60
    assert not np.array_equal(np.asarray(PC.pretrain_item(5, seed=1)[0]), np.asarray(im))


def test_pretrain_identities_have_four_images_and_are_not_synthpedes_ones(monkeypatch):
    drawn = []
    render = D.render_person
    def spy(attrs, rng, size=(128, 64), viewpoint=None, style="default"):
        drawn.append((attrs, style))
        return render(attrs, rng, size, viewpoint, style)
    monkeypatch.setattr(PC, "render_person", spy)
    for i in range(12): PC.pretrain_item(i)
    people = [a for a, _ in drawn]
    assert all(style == "web" for _, style in drawn)
    assert people[0] == people[3] and people[4] == people[7] and people[3] != people[4] and people[7] != people[8]
    synth = {tuple(a[k] for k in I.ATTRIBUTES) for a in I.make_identities(200, seed=0)}
    assert not any(tuple(a[k] for k in I.ATTRIBUTES) in synth for a in people)


# ---- rendering and the grid ------------------------------------------------------------------------

def test_render_sizes_styles_and_errors():
    a = I.sample_identity(np.random.default_rng(1))
    for style in D.STYLES:
        for size in ((128, 64), (256, 128)):
            im = D.render_person(a, np.random.default_rng(0), size=size, style=style)
            assert im.size == (size[1], size[0]) and im.mode == "RGB"
    with pytest.raises(TBPSError, match="unknown render style"):
        D.render_person(a, np.random.default_rng(0), style="oil")
    with pytest.raises(TBPSError, match="unknown viewpoint"):
        D.render_person(a, np.random.default_rng(0), viewpoint="top")


def test_sample_grid(ann):
    g = S.sample_grid(ann, n=8, split="train", seed=0, cols=4)
    arr = np.asarray(g)
    cw = g.size[0] // 4
    assert g.size[0] >= 4 * 128 and g.size[1] >= 2 * 256
    text = arr[262:300, :cw]  # just below the first (zoomed 256-pixel-high) image: pid and caption, dark on white
    assert (text < 100).any() and (text > 240).any()
    with pytest.raises(TBPSError, match="no images"):
        S.sample_grid(ann, split="nonsense")
