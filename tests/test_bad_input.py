"""Bad input gives a clear error naming the file, the entry and what is wrong; nothing is skipped silently."""
import json
import pickle

import pytest
import torch

from conftest import micro_overrides
from tbps_clip.config import make_config
from tbps_clip.core import TBPSError
from tbps_clip.model import create_model
from tbps_clip.annotations import read_annotations
from tbps_clip.run import train
from tbps_clip.weights import load_weights, read_checkpoint_file


def edit_records(path, fn):
    d = json.loads(path.read_text())
    fn(d["records"])
    path.write_text(json.dumps(d))


def test_missing_image_names_the_file(toy, tmp_path):
    entries = read_annotations(toy).entries
    (toy.parent / entries[0].image).unlink()
    with pytest.raises(TBPSError, match=r"annotations.json: 1 of the 42 image files it names are missing under .*toy: "
                                         r"images/train/0_0.png \(train, id 0\); set data.skip_bad_images=true"):
        train(make_config("clip", micro_overrides(toy, tmp_path / "r")), progress=False)
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


def test_a_folder_where_an_image_should_be_is_named_before_training(toy, tmp_path):
    entries = read_annotations(toy).entries
    (toy.parent / entries[0].image).unlink()
    (toy.parent / entries[0].image).mkdir()
    with pytest.raises(TBPSError, match=r"1 of the 42 image files it names are missing under .*: images/train/0_0.png \(train, id 0: not a file\)"):
        train(make_config("clip", micro_overrides(toy, tmp_path / "r")), progress=False)
    assert not (tmp_path / "r").exists()


def test_corrupt_image_names_the_file(toy, tmp_path):
    entries = read_annotations(toy).entries
    p = toy.parent / entries[1].image
    p.write_bytes(p.read_bytes()[:40])  # truncated PNG
    with pytest.raises(TBPSError, match=r"0_1.png: cannot read image"):
        train(make_config("clip", micro_overrides(toy, tmp_path / "r")), progress=False)


@pytest.mark.parametrize("mutate, message", [
    (lambda rs: rs[3].update(captions=[]), r"entry 3 \(images/train/1_0.png\): 'captions' must be a non-empty list"),
    (lambda rs: rs[2].pop("captions"), r"entry 2 \(images/train/0_2.png\): missing field\(s\) captions"),
    (lambda rs: rs[0].update(pid="7"), r"entry 0 .*'pid' must be an integer"),
    (lambda rs: rs[0].update(split="dev"), r"entry 0 .*'split' must be one of"),
    (lambda rs: rs[4].update(captions=["ok", "  "]), r"entry 4 .*caption 1 is empty"),
    (lambda rs: rs[5].update(image=rs[6]["image"]), r"appear in more than one entry"),
])
def test_bad_annotation_entries(toy, mutate, message):
    edit_records(toy, mutate)
    with pytest.raises(TBPSError, match=message):
        read_annotations(toy)


def test_image_path_leaving_the_root_is_refused(toy, tmp_path):
    edit_records(toy, lambda rs: rs[0].update(image="../../etc/passwd"))
    with pytest.raises(TBPSError, match=r"entry 0 .*leaves the image root"):  # refused when the file is read
        read_annotations(toy)


def test_not_json_and_wrong_format(tmp_path):
    (tmp_path / "a.json").write_text("{oops")
    with pytest.raises(TBPSError, match="a.json: not valid JSON"):
        read_annotations(tmp_path / "a.json")
    (tmp_path / "b.json").write_text("[]")
    with pytest.raises(TBPSError, match="not a tbps-clip annotation file"):
        read_annotations(tmp_path / "b.json")


def test_unknown_preset_and_key():
    with pytest.raises(TBPSError, match="unknown preset 'tbsp'"):
        make_config("tbsp")
    with pytest.raises(TBPSError, match="did you mean optim.lr"):
        make_config("clip", ["optim.lrr=1"])


class Evil:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_checkpoint_that_runs_code_is_refused_unless_trusted(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, p)
    with pytest.raises(TBPSError, match="refused to load.*trust=True"):
        read_checkpoint_file(p)
    assert read_checkpoint_file(p, trust=True)["model"] is None  # print() returned None: it did run


def test_truncated_checkpoint(tmp_path):
    m = create_model("tbps-micro")
    from tbps_clip.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "m.pt", m)
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "m.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(TBPSError, match="m.pt: not a readable checkpoint"):
        load_weights(m, tmp_path / "m.pt")


def test_foreign_state_dict_lists_the_differences(tmp_path):
    m = create_model("tbps-micro")
    sd = m.state_dict()
    sd.pop("clip.logit_scale")
    torch.save({"format": "tbps-clip-checkpoint", "identity": m.identity(), "model": sd}, tmp_path / "x.pt")
    with pytest.raises(TBPSError, match="1 missing: clip.logit_scale"):
        load_weights(m, tmp_path / "x.pt")
