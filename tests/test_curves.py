"""train.log_to: the values of history.json sent to TensorBoard and Weights & Biases as they are made."""
import glob
import json
import math
import struct

import pytest

from conftest import micro_overrides
from test_search import run_cli
from tbps_clip import curves
from tbps_clip.config import config_to_dict, make_config
from tbps_clip.core import TBPSError
from tbps_clip.run import resume_config, train
from tbps_clip.study.runs import config_difference, config_fingerprint


def history(out) -> dict:
    return json.loads((out / "history.json").read_text())


def expected(hist: dict) -> dict:
    "tag -> [(step, value)] that the loggers must hold for a history: train/<term> and val/<metric>."
    out = {}
    for part, prefix in (("train", "train"), ("eval", "val")):
        for h in hist[part]:
            for k, v in curves.scalars(h).items(): out.setdefault(f"{prefix}/{k}", []).append((h["step"], v))
    return out


def same_curves(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for (_, a), (_, b) in zip(got[tag], points)), tag  # float32 events


def test_tensorboard_events_hold_the_losses_and_val_metrics(toy, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the 'tensorboard' and 'dev' extras")
    out = tmp_path / "run"
    train(make_config("clip", micro_overrides(toy, out, **{"train.log_to": "tensorboard", "loss.citc": 0.1})), progress=False)
    got, hist = curves.read_tensorboard(out / "tensorboard"), history(out)
    assert {"train/loss", "train/itc", "train/citc", "train/lr", "val/R@1", "val/mAP"} <= set(got)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13)) and [s for s, _ in got["val/R@1"]] == [6]
    same_curves(got, expected(hist))


def test_tensorboard_after_a_resume_holds_each_step_once(toy, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the 'tensorboard' and 'dev' extras")
    from test_train import Crash
    out = tmp_path / "run"
    cfg = make_config("clip", micro_overrides(toy, out, **{"train.ckpt_every": 4, "train.log_to": "tensorboard"}))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, callbacks=[Crash(5)])  # steps 1-5 sent, checkpoint at step 4
    train(cfg, progress=False, resume=True)  # steps 5-12 sent by the resumed process
    same_curves(curves.read_tensorboard(out / "tensorboard"), expected(history(out)))


def wandb_history(run_file) -> list:
    "The history rows of an offline W&B run file (its records: the LevelDB log format of 32 KiB blocks, then protobuf)."
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf, rows = open(run_file, "rb").read(), 7, b"", []  # 7: the file header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7: pos += 32768 - pos % 32768; continue  # a block's tail too short for a record header
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            if r.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def test_wandb_offline_run_holds_the_losses_and_val_metrics(toy, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the 'wandb' and 'dev' extras")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(make_config("clip", micro_overrides(toy, out, **{"train.log_to": "tensorboard,wandb"})), progress=False)
    files = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    run_id = (out / "wandb-id.txt").read_text().strip()
    assert len(files) == 1 and files[0].endswith(f"run-{run_id}.wandb")
    got = {}
    for row in wandb_history(files[0]):
        for k, v in row.items():
            if not k.startswith("_"): got.setdefault(k, []).append((row["_step"], v))
    same_curves(got, expected(history(out)))
    assert (out / "tensorboard").is_dir()  # both loggers at once


def test_a_logger_that_is_not_installed_is_refused_before_anything_is_written(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(curves.LOGGERS, "wandb", ("no_such_module_here", "wandb"))
    out = tmp_path / "run"
    rc, _, err = run_cli("train", *[f"{k}={v}" for k, v in micro_overrides(toy, out, **{"train.log_to": "wandb"}).items()])
    assert rc == 2 and "train.log_to=wandb: wandb is not installed; pip install 'tbps-clip[wandb]'" in err, err
    assert not out.exists()


def test_log_to_is_checked_and_changes_no_result(toy, tmp_path):
    for bad in ("tensorbord", "", "none,wandb", "wandb,"):
        with pytest.raises(TBPSError, match="train.log_to=.*must be none, tensorboard, wandb or tensorboard,wandb"):
            make_config("clip", {"train.log_to": bad})
    a = config_to_dict(make_config("clip"))
    b = config_to_dict(make_config("clip", {"train.log_to": "tensorboard,wandb"}))
    assert config_difference(a, b) == {} and config_fingerprint(a) == config_fingerprint(b)  # the study's records stay valid
    del a["train"]["log_to"]  # a record written before the setting existed
    assert config_difference(a, b) == {} and config_fingerprint(a) == config_fingerprint(b)
    out = tmp_path / "run"
    train(make_config("clip", micro_overrides(toy, out, **{"train.max_steps": 2})), progress=False)
    assert resume_config(out, ["train.log_to=tensorboard"]).train.log_to == "tensorboard"  # a resumed run may start logging


def test_a_logger_that_cannot_start_stops_the_run_before_its_first_step(toy, tmp_path, monkeypatch):
    class NoLogin:
        def __init__(self, *a, **k): raise RuntimeError("No API key configured. Use `wandb login` to log in.")
    monkeypatch.setattr(curves, "WandbLog", NoLogin)
    monkeypatch.setitem(curves.LOGGERS, "wandb", ("json", "wandb"))  # 'installed'
    out = tmp_path / "run"
    rc, _, err = run_cli("train", *[f"{k}={v}" for k, v in micro_overrides(toy, out, **{"train.log_to": "wandb"}).items()])
    assert rc == 2 and err == ("tbps-clip: error: train.log_to=wandb: cannot start wandb (RuntimeError: No API key configured. "
                               "Use `wandb login` to log in.); WANDB_MODE=offline keeps the run on disk (`wandb sync` uploads "
                               "it later)\n"), err
    assert not (out / "checkpoint.pt").exists() and not (out / "history.json").exists()
