"""The real-data readers on tiny folders written in the exact published formats (tbps_clip.datasets)."""
import json
import warnings

import pytest

from tbps_clip.core import TBPSError
from tbps_clip.data import TrainPairs, eval_split
from tbps_clip.data import test_transform as make_test_transform
from tbps_clip.datasets import DATASETS, RawFormat, load_annotations, raw_formats, read_dataset, scan_dataset
from tbps_clip.fixtures import FIXTURE_DEFECTS, write_fixture

SINGLE_FILE = [k for k, f in raw_formats().items() if not f.per_split]  # the raw releases: one JSON list each
OFFICIAL_FILES = DATASETS["official"].split_files

SIZES = dict(n_ids=(5, 2, 3), images_per_id=3)


def counts(dataset):
    "Expected ids / images / captions per split of a clean fixture of SIZES."
    cpi = 1 if dataset == "icfg-pedes" else 2
    return {s: dict(ids=n, images=n * 3, captions=n * 3 * cpi)
            for s, n in zip(("train", "val", "test"), SIZES["n_ids"]) if s in DATASETS[dataset].splits}


@pytest.mark.parametrize("dataset", SINGLE_FILE)
def test_reader_counts_on_clean_fixture(dataset, tmp_path):
    write_fixture(dataset, tmp_path / dataset, **SIZES)
    ann = load_annotations(dataset, str(tmp_path / dataset))  # through the registry, as data.dataset=... does
    assert isinstance(DATASETS[dataset], RawFormat) and ann.dataset == dataset
    assert ann.summary() == counts(dataset)
    raw = json.loads((tmp_path / dataset / DATASETS[dataset].files[0]).read_text())
    assert len(ann.entries) == len(raw)  # nothing dropped
    r = next(r for r in ann.entries if r.split == "train")
    assert ann.image_path(r).is_file() and r.captions_bt == []  # raw releases have no back-translations


def test_raw_field_names_are_the_published_ones(tmp_path):
    write_fixture("rstpreid", tmp_path / "r")
    write_fixture("cuhk-pedes", tmp_path / "c")
    e = json.loads((tmp_path / "r" / "data_captions.json").read_text())[0]
    assert set(e) == {"id", "img_path", "captions", "split"}
    e = json.loads((tmp_path / "c" / "reid_raw.json").read_text())[0]
    assert set(e) == {"id", "file_path", "captions", "split", "processed_tokens"} and isinstance(e["id"], int)


def test_icfg_alternative_file_name_and_root_as_file(tmp_path):
    write_fixture("icfg-pedes", tmp_path / "i", **SIZES)
    (tmp_path / "i" / "ICFG-PEDES.json").rename(tmp_path / "i" / "ICFG_PEDES.json")
    assert read_dataset("icfg-pedes", tmp_path / "i").summary() == counts("icfg-pedes")
    assert read_dataset("icfg-pedes", tmp_path / "i" / "ICFG_PEDES.json").summary() == counts("icfg-pedes")


def test_icfg_has_no_val_split(tmp_path):
    write_fixture("icfg-pedes", tmp_path / "i")
    f = tmp_path / "i" / "ICFG-PEDES.json"
    raw = json.loads(f.read_text()); raw[0]["split"] = "val"; f.write_text(json.dumps(raw))
    with pytest.raises(TBPSError, match=r"ICFG-PEDES.json, entry 0 .*split 'val' is not one of train, test"):
        read_dataset("icfg-pedes", tmp_path / "i")


@pytest.mark.parametrize("dataset", ["cuhk-pedes", "rstpreid"])
def test_official_reader_with_back_translations(dataset, tmp_path):
    write_fixture(dataset, tmp_path / "o", official=True, **SIZES)
    assert sorted(p.name for p in tmp_path.joinpath("o").glob("*.json")) == sorted(OFFICIAL_FILES.values())
    ann = load_annotations("official", str(tmp_path / "o"))
    assert ann.summary() == counts(dataset) and ann.dataset == "official:o"
    assert all(len(r.captions_bt) == len(r.captions) for r in ann.split("train"))
    assert all(not r.captions_bt for r in ann.split("test"))


def test_official_test_file_alone_is_enough_for_evaluation(tmp_path):
    write_fixture("cuhk-pedes", tmp_path / "o", official=True, **SIZES)
    for s in ("train", "val"): (tmp_path / "o" / OFFICIAL_FILES[s]).unlink()
    ann = load_annotations("official", str(tmp_path / "o"))
    assert list(ann.summary()) == ["test"]
    es = eval_split(ann, "test")
    assert len(es.captions) == 18 and len(es.entries) == 9


def test_training_code_reads_any_dataset_alike(tmp_path):
    write_fixture("rstpreid", tmp_path / "r", **SIZES)
    ann = load_annotations("rstpreid", str(tmp_path / "r"))
    ds = TrainPairs(ann, "train", make_test_transform((32, 16)), context_length=32)
    item = ds[0]
    assert item["image"].shape == (3, 32, 16) and len(ds) == 30 and ds.num_classes == 5
    assert sorted(set(ds.pid_index.values())) == list(range(5))  # pids re-indexed 0..n-1 for training


@pytest.mark.parametrize("defect, message", [
    ("empty_caption", r"reid_raw.json, entry 1 \(train_query/p1_s1.jpg\): caption 1 is empty"),
    ("path_escape", r"entry \d+ \(\.\./\.\./etc/passwd\): file_path: path '../../etc/passwd' leaves the image root"),
    ("bad_type", r"entry \d+ \(extra/bad_id.jpg\): 'id' must be an integer, got '7'"),
    ("missing_field", r"entry \d+ \(extra/no_captions.jpg\): missing field\(s\) captions"),
    ("shared_id", r"shared_id .*id \d+ is in split 'train' here but in 'test'"),
    ("duplicate_image", r"duplicate_image .*image already listed by .*entry \d+"),
])
def test_reader_refuses_errors_naming_file_and_entry(defect, message, tmp_path):
    write_fixture("cuhk-pedes", tmp_path / "c", defects=[defect])
    with pytest.raises(TBPSError, match=message) as e:
        read_dataset("cuhk-pedes", tmp_path / "c")
    assert f"--drop {defect}" in str(e.value) and "tbps-clip prep cuhk-pedes" in str(e.value)


def test_reader_keeps_warnings_and_says_so(tmp_path):
    write_fixture("cuhk-pedes", tmp_path / "c", defects=["non_ascii", "duplicate_caption"], **SIZES)
    with pytest.warns(UserWarning, match=r"kept 1 non_ascii .*1 duplicate_caption"):
        ann = read_dataset("cuhk-pedes", tmp_path / "c")
    assert len(ann.entries) == sum(c["images"] for c in counts("cuhk-pedes").values())  # nothing dropped


def test_reader_drop_argument_drops_only_what_is_asked(tmp_path):
    write_fixture("cuhk-pedes", tmp_path / "c", defects=["empty_caption", "bad_type"], **SIZES)
    ann = read_dataset("cuhk-pedes", tmp_path / "c", drop="empty_caption,bad_type")
    n = sum(c["images"] for c in counts("cuhk-pedes").values())
    assert len(ann.entries) == n  # the bad_type entry was an extra one; the empty caption alone went
    assert sum(len(r.captions) for r in ann.entries) == 2 * n - 1


def test_missing_folder_and_files_are_explained(tmp_path):
    with pytest.raises(TBPSError, match="data.root is empty"):
        load_annotations("cuhk-pedes", "")
    with pytest.raises(TBPSError, match="dataset folder not found"):
        load_annotations("cuhk-pedes", str(tmp_path / "nope"))
    (tmp_path / "d").mkdir()
    with pytest.raises(TBPSError, match=r"no reid_raw.json here"):
        load_annotations("cuhk-pedes", str(tmp_path / "d"))
    (tmp_path / "d" / "reid_raw.json").write_text("[]")
    with pytest.raises(TBPSError, match=r"no image folder imgs/ here"):
        load_annotations("cuhk-pedes", str(tmp_path / "d"))
    (tmp_path / "d" / "imgs").mkdir(); (tmp_path / "d" / "reid_raw.json").write_text('{"a": 1}')
    with pytest.raises(TBPSError, match="reid_raw.json: expected a JSON list"):
        load_annotations("cuhk-pedes", str(tmp_path / "d"))
    (tmp_path / "d" / "reid_raw.json").write_text('[{"id": 1,')
    with pytest.raises(TBPSError, match="reid_raw.json: not valid JSON"):
        load_annotations("cuhk-pedes", str(tmp_path / "d"))
    with pytest.raises(TBPSError, match=r"none of train_reid.json, val_reid.json, test_reid.json"):
        load_annotations("official", str(tmp_path / "d"))


def test_image_folder_may_be_a_link(tmp_path):
    write_fixture("rstpreid", tmp_path / "store", **SIZES)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "data_captions.json").write_text((tmp_path / "store" / "data_captions.json").read_text())
    (tmp_path / "ds" / "imgs").symlink_to(tmp_path / "store" / "imgs")
    ann = read_dataset("rstpreid", tmp_path / "ds")
    assert ann.image_path(ann.entries[0]).is_file()


def test_every_fixture_defect_is_found_by_the_scan(tmp_path):
    fx = write_fixture("rstpreid", tmp_path / "r", defects=FIXTURE_DEFECTS, **SIZES)
    with warnings.catch_warnings():
        sc = scan_dataset("rstpreid", tmp_path / "r", check_images="decode")
    found = {k: sum(1 for i in sc.issues if i.kind == k) for k in fx["planted"]}
    assert found == dict(fx["planted"])
