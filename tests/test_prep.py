"""The preparation commands: validation report, dropping on request, merging back-translations (tbps_clip.datasets)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tbps_clip.datasets as D
import tbps_clip.fixtures as F
from tbps_clip.cli import main
from tbps_clip.core import TBPSError
from tbps_clip.annotations import read_annotations

SIZES = dict(n_ids=(5, 2, 3), images_per_id=3)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def broken(tmp_path):
    "A CUHK-PEDES folder with every defect users report."
    return F.write_fixture("cuhk-pedes", tmp_path / "CUHK-PEDES", defects=F.FIXTURE_DEFECTS, **SIZES)


def test_report_counts_every_defect_with_examples_and_writes_nothing(broken):
    rep = D.prepare("cuhk-pedes", broken["root"])
    assert {k: rep["issues"][k]["count"] for k in broken["planted"]} == dict(broken["planted"])
    for k in broken["planted"]:
        assert rep["issues"][k]["examples"] and "reid_raw.json" in rep["issues"][k]["examples"][0]
    assert rep["written"] is None and not (broken["root"] / "annotations.json").exists()
    assert rep["blocking"]["count"] == sum(n for k, n in broken["planted"].items() if D.ISSUE_KINDS[k][0] == "error")
    saved = json.loads(Path(rep["report_file"]).read_text())
    assert saved["issues"]["non_ascii"]["count"] == 1 and saved["written"] is None
    text = D.format_prep_report(rep)
    assert "NOT dropped: blocks writing" in text and "--drop " in text and "official" in text


def test_drop_errors_writes_annotations_and_reports_what_went(broken):
    clean = len(broken["entries"])
    rep = D.prepare("cuhk-pedes", broken["root"], drop="errors")
    assert rep["written"] and rep["blocking"]["count"] == 0
    ann = read_annotations(rep["written"])
    # dropped: the entries with a missing and an unreadable image, and the five broken entries the fixture added;
    # of the entry with an empty caption only that caption goes
    assert len(ann.entries) == clean - 2
    by = rep["dropped"]["by_kind"]
    assert by == {"missing_field": 1, "bad_type": 1, "path_escape": 1, "empty_caption": 1, "duplicate_image": 1,
                  "shared_id": 1, "missing_image": 1, "unreadable_image": 1}
    assert rep["dropped"]["captions"] == 1 and rep["dropped"]["entries"] == 7
    assert rep["issues"]["non_ascii"]["dropped"] is False  # warnings are kept unless named
    assert any("\u00e2" in c for r in ann.entries for c in r.captions)
    assert "dropped: 7 entries and 1 captions" in D.format_prep_report(rep)


def test_drop_warnings_too(broken):
    rep = D.prepare("cuhk-pedes", broken["root"], drop="all", check_images="decode")
    ann = read_annotations(rep["written"])
    assert not any(any(ord(ch) > 126 for ch in c) for r in ann.entries for c in r.captions)
    caps = [" ".join(c.lower().split()) for r in ann.entries for c in r.captions]
    assert len(caps) == len(set(caps))  # no caption under two identities any more
    assert rep["dropped"]["by_kind"]["duplicate_caption"] == 1 and rep["dropped"]["by_kind"]["non_ascii"] == 1


def test_statistics_against_the_official_numbers(tmp_path, monkeypatch):
    fx = F.write_fixture("rstpreid", tmp_path / "r", **SIZES)
    rep = D.prepare("rstpreid", fx["root"], check_images="exists")
    assert rep["issues"]["statistics"]["count"] == 8  # every published number differs at this size
    monkeypatch.setitem(D.OFFICIAL_STATS, "rstpreid", {"train": dict(ids=5, images=15, captions=30),
                                                        "val": dict(ids=2, images=6), "test": dict(ids=(3, 4), images=9)})
    rep = D.prepare("rstpreid", fx["root"], check_images="exists")
    assert "statistics" not in rep["issues"]
    monkeypatch.setitem(D.OFFICIAL_STATS, "rstpreid", {"test": dict(ids=200)})
    rep = D.prepare("rstpreid", fx["root"], check_images="exists")
    assert rep["issues"]["statistics"]["examples"] == [f"{fx['root'] / 'data_captions.json'}: test: 3 ids, official 200"]


def test_cli_exit_status_and_data_prep_script(broken, tmp_path, capsys):
    assert main(["prep", "cuhk-pedes", str(broken["root"]), "--check-images", "exists"]) == 2
    out, err = capsys.readouterr()
    assert "[error] path_escape: 1" in out and "nothing written" in err
    out_file = tmp_path / "ann" / "cuhk.json"
    assert main(["prep", "cuhk-pedes", str(broken["root"]), "--drop", "errors", "--out", str(out_file)]) == 0
    assert read_annotations(out_file).dataset == "cuhk-pedes" and out_file.with_suffix(".report.json").is_file()
    assert main(["prep", "cuhk-pedes", str(broken["root"]), "--drop", "typo"]) == 2
    r = subprocess.run([sys.executable, str(ROOT / "data_prep" / "prepare.py"), "rstpreid", str(tmp_path / "none")],
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "dataset folder not found" in r.stderr


def test_merge_back_translations(tmp_path):
    root = tmp_path / "CUHK-PEDES"
    fx = F.write_fixture("cuhk-pedes", root, **SIZES)
    off = tmp_path / "official"
    F.write_fixture("cuhk-pedes", off, official=True, **SIZES)  # the authors' files for the same images
    raw = json.loads((root / "reid_raw.json").read_text())
    raw[0]["captions"][1] = "  " + raw[0]["captions"][1].upper() + " "  # matches loosely (case and spacing)
    raw[1]["captions"][0] = "A caption the authors' files do not have."
    (root / "reid_raw.json").write_text(json.dumps(raw))
    ann_file = D.prepare("cuhk-pedes", root, check_images="none")["written"]
    entries = json.loads((off / "train_reid.json").read_text())
    (off / "train_reid.json").write_text(json.dumps([e for e in entries if e["file_path"] != raw[2]["file_path"]]))
    rep = D.merge_back_translations(ann_file, off)
    n_train = 15
    assert rep["splits"] == ["train"] and rep["records"] == n_train and rep["records_matched"] == n_train - 1
    assert rep["captions_without_bt"] == 1 and rep["captions_matched"] == 2 * (n_train - 1) - 1
    assert rep["examples_records"] == [f"train {raw[2]['file_path']}"]
    ann = read_annotations(rep["written"])
    by_img = {r.image: r for r in ann.entries}
    want = {r.image: r for r in fx["entries"]}
    r0, r1 = by_img[raw[0]["file_path"]], by_img[raw[1]["file_path"]]
    assert r0.captions_bt == want[r0.image].captions_bt
    assert r1.captions_bt == [r1.captions[0], want[r1.image].captions_bt[1]]  # own text where nothing matched
    assert by_img[raw[2]["file_path"]].captions_bt == []
    assert all(not r.captions_bt for r in ann.entries if r.split != "train")
    assert ann.meta["back_translations"]["captions_without_bt"] == 1
    assert "keep their own text" in D.format_merge_report(rep)


def test_merge_needs_the_authors_files(tmp_path):
    fx = F.write_fixture("rstpreid", tmp_path / "r")
    ann_file = D.prepare("rstpreid", fx["root"], check_images="none")["written"]
    with pytest.raises(TBPSError, match="none of train_reid.json"):
        D.merge_back_translations(ann_file, tmp_path)
