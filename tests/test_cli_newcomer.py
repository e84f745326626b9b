"""What a new user gets wrong on the command line: each bad input is one line naming the file or value, exit 2, nothing written."""
import argparse
import fractions
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import micro_overrides
from test_search import indexed_toy_gallery, run_cli
from test_train import Crash
from tbps_clip.cli import build_parser
from tbps_clip.config import config_to_dict, load_config, make_config
from tbps_clip.core import TBPSError
from tbps_clip.run import train
from tbps_clip.weights import read_checkpoint_file


def files(folder) -> dict:
    "Every file under `folder` with its bytes (to show that a refused command wrote nothing)."
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def refused(rc, out, err, *says):
    "The command failed with exit status 2 and one line of error that contains each of `says`."
    assert rc == 2 and err.startswith("tbps-clip: error: ") and err.count("\n") == 1, (rc, err)
    assert all(s in err for s in says), err
    assert "Traceback" not in out + err


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    "A toy dataset, a micro checkpoint and an index of the test images."
    return indexed_toy_gallery(tmp_path_factory.mktemp("newcomer"), (2, 1, 3))


# ---- 1. a file that is not a checkpoint is named for what it is -------------------------------------------

NOT_CHECKPOINTS = {
    "notes.txt": (lambda p: p.write_text("my notes about the run\n"), "it looks like a text file"),
    "config.json": (lambda p: p.write_text('{"lr": 0.001}'), "it looks like a JSON file"),
    "photo.jpg": (lambda p: Image.new("RGB", (16, 32), "red").save(p), "it looks like a JPEG image"),
    "photo.png": (lambda p: Image.new("RGB", (16, 32), "red").save(p), "it looks like a PNG image"),
    "random.pt": (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "it is binary data in no format"),
    "empty.pt": (lambda p: p.write_bytes(b""), "it is empty"),
}


@pytest.mark.parametrize("trust", [[], ["--trust"]], ids=["untrusted", "trusted"])
@pytest.mark.parametrize("name", list(NOT_CHECKPOINTS))
def test_eval_of_a_file_that_is_not_a_checkpoint(tmp_path, monkeypatch, name, trust):
    monkeypatch.setenv("TBPS_CLIP_CACHE", str(tmp_path / "cache"))
    make, says = NOT_CHECKPOINTS[name]
    make(tmp_path / name)
    before = files(tmp_path)
    refused(*run_cli("eval", tmp_path / name, "--out", tmp_path / "eval.json", *trust),
            f"{tmp_path / name} is not a checkpoint ({says}")
    assert files(tmp_path) == before  # no record, and no SynthPEDES generated in the cache


@pytest.mark.parametrize("name", ["notes.txt", "photo.png", "random.pt"])
def test_search_and_index_with_a_file_that_is_not_a_checkpoint(gallery, tmp_path, name):
    make, says = NOT_CHECKPOINTS[name]
    make(tmp_path / name)
    refused(*run_cli("search", "a person in red", "--index", gallery["idx"], "--checkpoint", tmp_path / name),
            f"{tmp_path / name} is not a checkpoint ({says}")
    refused(*run_cli("index", gallery["images"], "--out", tmp_path / "idx", "--checkpoint", tmp_path / name, "--trust"),
            f"{tmp_path / name} is not a checkpoint ({says}")
    assert not (tmp_path / "idx").exists()


def pickled_objects_checkpoint(gallery, path):
    "A real checkpoint that also holds a Python object `weights_only` loading refuses (a harmless Fraction)."
    obj = torch.load(gallery["ckpt"], weights_only=True)
    obj["state"] = {"note": fractions.Fraction(1, 3)}
    torch.save(obj, path)
    return path


def test_trust_is_honoured_wherever_it_is_accepted(gallery, tmp_path):
    ck = pickled_objects_checkpoint(gallery, tmp_path / "objects.pt")
    refused(*run_cli("eval", ck), f"{ck}: refused to load", "it would import fractions.Fraction", "--trust")
    refused(*run_cli("search", "a person", "--index", gallery["idx"], "--checkpoint", ck), f"{ck}: refused to load")
    rc, out, err = run_cli("eval", ck, "--trust", "--out", tmp_path / "eval.json")
    assert rc == 0 and json.loads((tmp_path / "eval.json").read_text())["kind"] == "eval", err
    rc, out, err = run_cli("search", "a person in red", "--index", gallery["idx"], "--checkpoint", ck, "--trust", "-k", "2")
    assert rc == 0 and out.count("\n") == 3, err  # the same weights as the index's model: accepted
    rc, out, err = run_cli("index", gallery["images"], "--out", tmp_path / "idx", "--checkpoint", ck, "--trust", "--quiet")
    assert rc == 0 and (tmp_path / "idx" / "index.json").is_file(), err


# ---- 2. eval checks the checkpoint before it reads or makes any data ------------------------------------------

def test_eval_refuses_a_torch_file_that_is_no_model_before_making_data(tmp_path, monkeypatch):
    monkeypatch.setenv("TBPS_CLIP_CACHE", str(tmp_path / "cache"))
    torch.save({"weights": [1, 2, 3]}, tmp_path / "dict.pt")
    refused(*run_cli("eval", tmp_path / "dict.pt"), f"{tmp_path / 'dict.pt'}: unrecognised checkpoint format")
    assert not (tmp_path / "cache").exists()  # the default SynthPEDES was not generated first


# ---- 3. the configuration is checked when it is built --------------------------------------------------------

@pytest.mark.parametrize("override, says", [
    ("data.batch_size=0", "data.batch_size=0: must be at least 1"),
    ("data.batch_size=-4", "data.batch_size=-4: must be at least 1"),
    ("data.image_size=abc", "data.image_size=['abc']: must be two positive integers"),
    ("data.image_size=[130,64]", "data.image_size=[130, 64]: both sides must be multiples of tbps-tiny-cs's patch size 16"),
    ("model.arch=ViT-B-99", "model.arch='ViT-B-99': unknown architecture 'ViT-B-99'"),
    ("aug.hflip_p=2", "aug.hflip_p=2.0: must lie between 0 and 1"),
    ("train.precision=fp64", "train.precision='fp64': must be one of amp, bf16, fp16, fp32"),
])
def test_config_and_train_refuse_the_same_values(tmp_path, override, says):
    rc, out, err = run_cli("config", override)
    refused(rc, out, err, says)
    assert out == ""
    refused(*run_cli("train", "--out", tmp_path / "run", override), says)
    assert not (tmp_path / "run").exists()


def test_a_saved_config_is_checked_on_loading(tmp_path):
    (tmp_path / "config.yaml").write_text("data:\n  batch_size: 0\n")
    with pytest.raises(TBPSError, match=r"config.yaml: data.batch_size=0: must be at least 1"):
        load_config(tmp_path / "config.yaml")


# ---- 4. train --resume resumes the run in the folder as it was configured -------------------------------------

@pytest.fixture
def interrupted_run(toy, tmp_path):
    "A micro run with the 'clip_star' preset, interrupted after step 3 (checkpoint at step 2)."
    cfg = make_config("clip_star", micro_overrides(toy, tmp_path / "run", **{"train.max_steps": 6, "train.ckpt_every": 2}))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, callbacks=[Crash(3)])
    return cfg, tmp_path / "run"


def test_resume_continues_the_run_as_configured(interrupted_run, monkeypatch):
    cfg, run = interrupted_run
    from tbps_clip.train import Trainer
    loads, real_load = [], Trainer.load
    monkeypatch.setattr(Trainer, "load", lambda self: (loads.append(self.ckpt_path), real_load(self))[1])
    rc, out, err = run_cli("train", "--out", run, "--resume", "data.num_workers=0")  # how it runs may change
    assert rc == 0, err
    assert out.startswith(f"resuming {run} as its config.yaml says: preset clip_star, model tbps-micro\n")
    assert loads == [run / "checkpoint.pt"]  # continued from its checkpoint, not started again
    rec = json.loads((run / "results.json").read_text())
    assert rec["steps"] == 6 and load_config(run / "config.yaml") == cfg
    assert rec["config"] == config_to_dict(cfg) and rec["preset"] == "clip_star"


@pytest.mark.parametrize("args, says", [
    (["optim.lr=0.5"], "optim.lr=0.5: the run in {run} has optim.lr=0.001 ({run}/config.yaml); a resumed run cannot change it"),
    (["model.arch=tbps-tiny", "train.device=cpu"], "model.arch=tbps-tiny: the run in {run} has model.arch='tbps-micro'"),
    (["--preset", "tbps"], "--preset tbps: the run in {run} has preset clip_star ({run}/config.yaml); a resumed run keeps it"),
])
def test_resume_refuses_changes_to_the_run(interrupted_run, args, says):
    _, run = interrupted_run
    before = files(run)
    refused(*run_cli("train", "--out", run, "--resume", *args), says.format(run=run))
    assert files(run) == before


def test_resume_accepts_the_original_command_again(interrupted_run, toy):
    cfg, run = interrupted_run
    original = [f"{k}={v}" for k, v in micro_overrides(toy, run, **{"train.max_steps": 6, "train.ckpt_every": 2}).items()]
    rc, out, err = run_cli("train", "--preset", "clip_star", "--resume", *original)  # out_dir=RUN names the run
    assert rc == 0 and out.startswith(f"resuming {run} as its config.yaml says"), err
    assert json.loads((run / "results.json").read_text())["config"] == config_to_dict(cfg)


def test_resume_refuses_a_folder_with_no_run(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(*run_cli("train", "--out", tmp_path / "empty", "--resume"), f"{tmp_path / 'empty'}: no run to resume (no config.yaml in it)")
    refused(*run_cli("train", "--out", tmp_path / "absent", "--resume"), f"{tmp_path / 'absent'}: no run to resume (no such folder)")
    refused(*run_cli("train", "--resume"), "--resume needs the run folder")
    assert list(tmp_path.iterdir()) == [tmp_path / "empty"] and not list((tmp_path / "empty").iterdir())


# ---- 5. nothing to index, nothing to search ------------------------------------------------------------------

def test_index_of_an_empty_gallery_is_refused(gallery, tmp_path):
    (tmp_path / "empty").mkdir()
    refused(*run_cli("index", tmp_path / "empty", "--out", tmp_path / "idx", "--checkpoint", gallery["ckpt"]),
            f"{tmp_path / 'empty'}: no image files to index; no index written")
    (tmp_path / "list.txt").write_text("")
    refused(*run_cli("index", tmp_path / "list.txt", "--out", tmp_path / "idx", "--checkpoint", gallery["ckpt"]),
            f"{tmp_path / 'list.txt'}: lists no images")
    assert not (tmp_path / "idx").exists()


def test_index_of_a_gallery_of_unreadable_files_is_refused(gallery, tmp_path):
    g = tmp_path / "g"
    g.mkdir()
    (g / "a.png").write_bytes(b"not an image")
    (g / "b.jpg").write_bytes(b"")
    (g / "readme.md").write_text("photos")
    refused(*run_cli("index", g, "--out", tmp_path / "idx", "--checkpoint", gallery["ckpt"], "--quiet"),
            f"{g}: none of the 2 image file(s) could be read (first: {g / 'a.png'}: ", "no index written")
    assert not (tmp_path / "idx").exists()


def empty_index(gallery, folder):
    "An index with no images, as an earlier version wrote for an empty gallery."
    d = json.loads((gallery["idx"] / "index.json").read_text())
    d.update(count=0, paths=[], parts=[])
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps(d))
    return folder


def test_search_and_serve_refuse_an_empty_index(gallery, tmp_path):
    idx = empty_index(gallery, tmp_path / "idx")
    says = f"{idx / 'index.json'}: the index holds no images"
    refused(*run_cli("search", "a person in red", "--index", idx), says)
    refused(*run_cli("serve", "--index", idx, "--port", "0"), says)
    assert files(tmp_path) == {idx / "index.json": (idx / "index.json").read_bytes()}


# ---- 8. help, version, defaults, one spelling of overrides ---------------------------------------------------

def test_bare_command_prints_the_help_and_version(capsys):
    from tbps_clip import __version__
    rc, out, err = run_cli()
    assert rc == 0 and out.startswith("usage: tbps-clip") and all(c in out for c in ("train", "eval", "search", "study"))
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"tbps-clip {__version__}\n"


def parsers(p, name="tbps-clip"):
    "Every (name, parser) of `p` and its subcommands."
    yield name, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub_name, sp in a.choices.items():
                yield from parsers(sp, f"{name} {sub_name}")


def test_every_option_has_a_help_that_shows_its_default():
    from tbps_clip.pretrain import PRETRAIN_DEFAULTS
    seen = 0
    for name, p in parsers(build_parser()):
        fmt = p._get_formatter()
        for a in p._actions:
            if not a.option_strings or a.help == argparse.SUPPRESS or isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            seen += 1
            assert a.help, f"{name} {a.option_strings[0]}: no help"
            flag = isinstance(a, (argparse._StoreTrueAction, argparse._StoreConstAction))
            if not (flag or a.required):
                assert "default" in fmt._get_help_string(a), f"{name} {a.option_strings[0]}: {a.help!r}"
    assert seen > 50
    steps = next(a for n, p in parsers(build_parser()) if n == "tbps-clip pretrain" for a in p._actions if a.dest == "steps")
    assert f"default: {PRETRAIN_DEFAULTS['steps']}" in steps.help


def test_overrides_are_key_value_arguments_everywhere(gallery, tmp_path):
    p = build_parser()
    for cmd in (["train"], ["eval", "x.pt"], ["config"], ["index", "g", "--out", "i"], ["serve", "--index", "i"], ["demo"]):
        assert p.parse_args([*cmd, "data.batch_size=8"]).overrides == ["data.batch_size=8"], cmd
    rc, out, err = run_cli("search", "a person in red", "--index", gallery["idx"], "--checkpoint", gallery["ckpt"], "-k", "1",
                           "train.device=cpu")
    assert rc == 0 and out.startswith("query: a person in red\n") and out.count("\n") == 2, err
    refused(*run_cli("search", "a person in red", "--index", gallery["idx"], "--checkpoint", gallery["ckpt"], "data.batchsize=8"),
            "unknown configuration key 'data.batchsize'")
    refused(*run_cli("search", "a person in red", "--index", gallery["idx"], "train.device=cpu"),
            "train.device=cpu: overrides need --checkpoint")
    refused(*run_cli("serve", "--index", gallery["idx"], "train.device=cpu"), "train.device=cpu: overrides need --checkpoint")


def test_study_parameters_have_their_own_spelling(tmp_path):
    a = build_parser().parse_args(["study", "run", "sweep.yaml", "-p", "steps=5", "--param", "seeds=[0, 1]"])
    assert a.params == ["steps=5", "seeds=[0, 1]"]
    rc, out, err = run_cli("study", "run", tmp_path / "nope.yaml", "--set", "steps=5")  # the old spelling still works, with a warning
    assert rc == 2 and "--set is deprecated; write notebook parameters as -p NAME=VALUE" in err and "nope.yaml" in err
    rc, out, err = run_cli("search", "a person", "--index", tmp_path / "none", "--set", "train.device=cpu")
    assert rc == 2 and "--set is deprecated; write overrides as key=value arguments" in err


# ---- 9. the command answers at once: help, version and configuration errors without torch ---------------------

FAST = [[], ["--version"], ["--help"], *[[c, "--help"] for c in ("synth", "pretrain", "train", "eval", "prep", "demo", "config",
                                                                  "index", "search", "serve", "study")],
        ["study", "run", "--help"], ["study", "collect", "--help"], ["study", "status", "--help"], ["prep", "official", "--help"],
        ["config", "data.batch_size=0"], ["train", "data.batchsize=32"], ["train", "--preset", "clip-star"], ["demo", "optim.lr=fast"],
        ["eval", "x.pt", "aug.hflip_p=2x"], ["index", "g", "--out", "i", "model.arhc=x"], ["serve", "--index", "i", "--port", "99999"]]


def test_help_version_and_configuration_errors_do_not_import_torch(tmp_path):
    "Each command line of FAST, run in one fresh process in turn: its exit status, and whether torch (or numpy) was imported."
    code = ("import contextlib, io, json, sys\n"
            "from tbps_clip.cli import main\n"
            "out = []\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "        try: rc = main(argv)\n"
            "        except SystemExit as e: rc = e.code\n"
            "    out.append([argv, rc, 'torch' in sys.modules, 'numpy' in sys.modules])\n"
            "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(FAST)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout)
    assert [s[0] for s in seen] == FAST
    for argv, rc, torch_in, numpy_in in seen:
        assert rc == (0 if not argv or argv[-1] in ("--help", "--version") else 2), argv
        assert not torch_in and not numpy_in, f"tbps-clip {' '.join(argv)} imported {'torch' if torch_in else 'numpy'}"


def test_every_command_help_starts_with_a_one_line_description():
    seen = 0
    for name, p in parsers(build_parser()):
        if name == "tbps-clip": continue
        seen += 1
        d = p.description or ""
        assert d and "\n" not in d and len(d) <= 78 and d[0].isupper() and d.endswith("."), f"{name}: {d!r}"
        paragraphs = p.format_help().split("\n\n")
        assert paragraphs[0].startswith(f"usage: {name}") and paragraphs[1] == d, f"{name}: {paragraphs[:2]}"
    assert seen >= 19  # 11 commands, 3 study commands, 5 prep commands


# ---- 10. the remaining bad inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_refuses_a_port_out_of_range_at_once(tmp_path, port):
    refused(*run_cli("serve", "--index", tmp_path / "not-even-loaded", "--port", port), f"--port {port}: ports are 0-65535")


def without_images(toy, *names):
    "Delete the toy dataset's images `names` (paths relative to its folder); the annotation file still lists them."
    for n in names: (toy.parent / n).unlink()
    return toy


def test_train_refuses_missing_images_before_it_writes_anything(toy, tmp_path):
    without_images(toy, "images/train/3_0.png", "images/train/3_1.png", "images/train/5_2.png", "images/train/6_0.png")
    run = tmp_path / "run"
    args = [f"{k}={v}" for k, v in micro_overrides(toy, run).items()]
    refused(*run_cli("train", *args), f"{toy}: 4 of the 42 image files it names are missing under {toy.parent}: ",
            "images/train/3_0.png (train, id 3), images/train/3_1.png (train, id 3), images/train/5_2.png (train, id 5) and 1 more",
            "set data.skip_bad_images=true")
    assert not run.exists()
    rc, out, err = run_cli("train", *args, "data.skip_bad_images=true", "eval.fit_probe=0", "train.max_steps=2")
    assert rc == 0 and json.loads((run / "results.json").read_text())["skipped_images"]["count"] == 4, err


def test_missing_evaluation_images_are_refused_even_when_skipping_training_images(toy, tmp_path):
    without_images(toy, "images/test/10_1.png")
    run = tmp_path / "run"
    args = [f"{k}={v}" for k, v in micro_overrides(toy, run, **{"data.skip_bad_images": True}).items()]
    refused(*run_cli("train", *args), "1 of the", "images/test/10_1.png (test, id 10)", "leaves out training images only")
    assert not run.exists()


def test_study_collect_refuses_a_folder_without_records(tmp_path):
    refused(*run_cli("study", "collect", tmp_path), f"{tmp_path}: not a sweep's results folder with records (no records/ folder in it)")
    (tmp_path / "records").mkdir()
    refused(*run_cli("study", "collect", tmp_path), "its records/ folder holds no run records yet")
    assert [p.name for p in tmp_path.iterdir()] == ["records"] and not list((tmp_path / "records").iterdir())


def test_search_says_in_one_line_when_a_description_is_cut(gallery):
    long = ("a woman in a long red coat with a black handbag and white trainers walking a small brown dog along a busy "
            "street next to a parked blue car while talking on her phone")
    rc, out, err = run_cli("search", long, "--index", gallery["idx"], "-k", "2")
    assert rc == 0 and out.startswith(f"query: {long}\n") and out.count("\n") == 3, err
    assert err == ('tbps-clip: note: the description "a woman in a long red ..." is cut to its first 30 of 34 words '
                   '(the model reads 32 text tokens); not searched: "talking on her phone"\n')
    rc, out, err = run_cli("search", "a woman in a long red coat", "--index", gallery["idx"], "-k", "2")
    assert rc == 0 and err == ""


def test_ctrl_c_during_train_saves_and_prints_the_command_that_resumes(toy, tmp_path):
    "A real SIGINT to the process group, as Ctrl-C in a terminal sends it."
    run = tmp_path / "run"
    args = [f"{k}={v}" for k, v in micro_overrides(toy, run, **{"train.max_steps": 100000, "train.ckpt_every": 0}).items()]
    p = subprocess.Popen([sys.executable, "-m", "tbps_clip.cli", "train", *args], cwd=tmp_path, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (run / "config.yaml").is_file() and p.poll() is None and time.monotonic() < deadline: time.sleep(0.2)
        time.sleep(2)  # some steps
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
    step = read_checkpoint_file(run / "checkpoint.pt")["state"]["step"]
    last = err.rstrip("\n").split("\n")[-1]  # a line of its own, after the progress bar's
    assert p.returncode == 130 and step > 0, err[-2000:]
    assert last == (f"tbps-clip: interrupted; saved after step {step} in {run / 'checkpoint.pt'}; "
                    f"resume with: tbps-clip train --out {run} --resume"), err[-2000:]

def test_results_on_synthetic_data_are_labelled_one_way_everywhere():
    from tbps_clip.config import dataset_label
    from tbps_clip.study.report import data_label
    assert dataset_label("synthpedes") == "SynthPEDES (synthetic)" and dataset_label("cuhk-pedes") == "cuhk-pedes"
    assert data_label([dict(dataset="synthpedes", synthetic=True)]) == dataset_label("synthpedes")  # the study's reports
    assert data_label([dict(dataset="cuhk-pedes", synthetic=False)]) == "cuhk-pedes"
