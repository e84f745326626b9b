"""Faults while training and saving: SIGKILL at seeded random points (also inside a checkpoint write) and resume,
a full disk or read-only folder while saving, and checkpoints that are malicious or made for another model."""
import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import micro_overrides
from tbps_clip.checkpoint import check_identity, load_state_strict, save_checkpoint
from tbps_clip.config import make_config
from tbps_clip.core import TBPSError
from tbps_clip.model import create_model
from tbps_clip.run import evaluate_checkpoint, train
from tbps_clip.weights import load_weights, read_checkpoint_file

REPO = Path(__file__).resolve().parents[1]
EXTRA = {"train.ckpt_every": 1, "train.threads": 1, "train.max_steps": 10, "trick.text_dropout": 0.1}  # dropout: RNG must resume too

def timing(key: str) -> bool:
    "Whether a result entry measures time (encode_s, rank_s, train_seconds, ...), not results."
    return key.endswith("_s") or "seconds" in key


def overrides(toy, out):
    return micro_overrides(toy, out, **EXTRA)


def untimed(x):
    "`x` without the entries that measure time (recursively)."
    if isinstance(x, dict): return {k: untimed(v) for k, v in x.items() if not timing(k)}
    if isinstance(x, list): return [untimed(v) for v in x]
    return x


def same_results(a: dict, b: dict) -> bool:
    "Equal metrics, timings aside."
    return untimed(a) == untimed(b)


# --- SIGKILL and resume ------------------------------------------------------------------------------------------

# The child runs `tbps-clip train` and kills itself with SIGKILL at the point KILL_AT names:
#   write:K:F    inside the K-th write of checkpoint.pt, after a fraction F of the bytes reached the temporary file
#   replace:K    just after the K-th checkpoint.pt was renamed into place, before history.json is written
#   step:N       inside the N-th optimisation step of this process, after backward, before the optimizer step
#   slow:S       no kill: every step sleeps S seconds, so that an external kill lands inside the run on any machine
# ("external" trials are killed by the test itself at a seeded random moment of such a slowed run.)
CHILD = r"""
import os, signal, sys
spec = os.environ.get("KILL_AT", "")
kind, *arg = spec.split(":") if spec else ("",)
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if kind == "write":
    import tbps_clip.core as core
    k, frac, n = int(arg[0]), float(arg[1]), [0]
    real_fdopen, real_mkstemp, target = os.fdopen, core.tempfile.mkstemp, set()
    def mkstemp(*a, **kw):
        fd, tmp = real_mkstemp(*a, **kw)
        if os.path.basename(tmp).startswith(".checkpoint.pt."):
            n[0] += 1
            if n[0] == k: target.add(fd)
        return fd, tmp
    class Dying:
        def __init__(self, f): self.f = f
        def write(self, data):
            self.f.write(data[: int(len(data) * frac)]); self.f.flush(); os.fsync(self.f.fileno()); die()
        def __getattr__(self, name): return getattr(self.f, name)
        def __enter__(self): return self
        def __exit__(self, *e): return self.f.__exit__(*e)
    def fdopen(fd, *a, **kw):
        f = real_fdopen(fd, *a, **kw)
        return Dying(f) if fd in target else f
    core.tempfile.mkstemp, os.fdopen = mkstemp, fdopen
elif kind == "replace":
    k, n, real_replace = int(arg[0]), [0], os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if os.path.basename(str(dst)) == "checkpoint.pt":
            n[0] += 1
            if n[0] == k: die()
    os.replace = replace
elif kind == "step":
    import tbps_clip.train as tr
    k, n, real_backward = int(arg[0]), [0], tr.Trainer.backward
    def backward(self):
        real_backward(self)
        n[0] += 1
        if n[0] == k: die()
    tr.Trainer.backward = backward
elif kind == "slow":
    import time
    import tbps_clip.train as tr
    pause, real_backward = float(arg[0]), tr.Trainer.backward
    def backward(self):
        real_backward(self)
        time.sleep(pause)
    tr.Trainer.backward = backward
from tbps_clip.cli import main
sys.exit(main(sys.argv[1:]))
"""


def child(toy, out, kill_at="", resume=False):
    "Start `tbps-clip train` on the micro model in a child process."
    args = [sys.executable, "-c", CHILD, "train", "--preset", "clip"] + (["--resume"] if resume else [])
    args += [f"{k}={v}" for k, v in overrides(toy, out).items()]
    env = {**os.environ, "KILL_AT": kill_at, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after_first_save(p, out, delay):
    "SIGKILL `p` `delay` seconds after its first checkpoint appears (or let it end)."
    t0 = time.time()
    while not (out / "checkpoint.pt").exists() and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    time.sleep(delay)
    if p.poll() is None: p.send_signal(signal.SIGKILL)


def check_latest_checkpoint(out):
    "The checkpoint a kill left behind is complete: it loads into the model and names a step within the run."
    ck = out / "checkpoint.pt"
    if not ck.exists(): return None
    obj = read_checkpoint_file(ck)
    m = create_model("tbps-micro", (32, 16))
    check_identity(m.identity(), obj["identity"], str(ck))
    load_state_strict(m, obj["model"], str(ck))
    assert 1 <= obj["state"]["step"] <= EXTRA["train.max_steps"]
    return obj["state"]["step"]


SLOW = 0.2  # seconds a step of an externally killed run: 9 steps after the first save outlast the 1 s longest delay


def trials(seed=0):
    """The seeded kill plan: one trial per kind of moment, the last one killed twice (the resumed run dies too).
    The external kill comes at most 1 s (5 slowed steps) after the first save (step 1), so the resumed run still has at
    least 4 checkpoint writes to make and its `write:K` (K <= 3) always happens, however fast the machine."""
    rng = random.Random(seed)
    steps = EXTRA["train.max_steps"]
    return [[f"write:{rng.randint(2, steps - 2)}:{rng.uniform(0.05, 0.95):.2f}"],
            [f"replace:{rng.randint(2, steps - 2)}"],
            [f"step:{rng.randint(2, steps - 1)}"],
            [f"external:{rng.uniform(0.0, 1.0):.2f}", f"write:{rng.randint(1, 3)}:{rng.uniform(0.05, 0.95):.2f}"]]


def test_sigkill_and_resume_give_the_uninterrupted_result(toy, tmp_path, record_property):
    t0 = time.time()
    base = train(make_config("clip", overrides(toy, tmp_path / "base")), progress=False)
    base_hist = json.loads((tmp_path / "base" / "history.json").read_text())
    plan, kills, done = trials(), [], 0
    for t, points in enumerate(plan):
        out = tmp_path / f"trial{t}"
        for j, point in enumerate(points):
            kind, _, arg = point.partition(":")
            p = child(toy, out, f"slow:{SLOW}" if kind == "external" else point, resume=j > 0)
            if kind == "external": kill_after_first_save(p, out, float(arg))
            _, err = p.communicate(timeout=600)
            assert p.returncode == -signal.SIGKILL, f"trial {t} ({point}) was not killed: exit {p.returncode}\n{err[-2000:]}"
            kills.append(dict(trial=t, at=point, checkpoint_step=check_latest_checkpoint(out),
                              temp_left=len(list(out.glob(".*.tmp")))))  # removed by the next save of the resumed run
        p = child(toy, out, resume=True)
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        rec = json.loads((out / "results.json").read_text())
        assert rec["steps"] == base["steps"]
        assert same_results(rec["metrics"], base["metrics"]), (point, rec["metrics"], base["metrics"])
        assert untimed(json.loads((out / "history.json").read_text())) == untimed(base_hist)  # every logged loss
        assert not list(out.glob(".*.tmp")), "the temporary file of a killed save is still there"
        done += 1
    assert any(k["temp_left"] for k in kills)  # a kill inside a write did leave a half-written temporary file
    print(f"\nkill-and-resume: {done} trials, {len(kills)} SIGKILLs, all identical to the uninterrupted run: {kills}")
    record_property("kill_trials", done); record_property("kills", len(kills))
    record_property("seconds", round(time.time() - t0, 1))


# --- a full disk or a read-only folder while saving -----------------------------------------------------------------

def failing_on_save(monkeypatch, after: int, make_error):
    "Make the `after`-th and later writes of checkpoint.pt fail with `make_error()` in the temporary-file step."
    import tbps_clip.core as core
    real, n = core.tempfile.mkstemp, [0]
    def mkstemp(*a, **kw):
        fd, tmp = real(*a, **kw)
        if os.path.basename(tmp).startswith(".checkpoint.pt."):
            n[0] += 1
            if n[0] >= after:
                return _Failing(fd, make_error), tmp
        return fd, tmp
    monkeypatch.setattr(core.tempfile, "mkstemp", mkstemp)


class _Failing(int):
    "A file descriptor whose file fails on write (os.fdopen is given it; see `failing_fdopen`)."
    def __new__(cls, fd, make_error):
        o = int.__new__(cls, fd); o.make_error = make_error; return o


@pytest.fixture
def failing_fdopen(monkeypatch):
    real = os.fdopen
    class F:
        def __init__(self, f, err): self.f, self.err = f, err
        def write(self, data): self.f.write(data[:100]); raise self.err()
        def __enter__(self): return self
        def __exit__(self, *e): return self.f.__exit__(*e)
    def fdopen(fd, *a, **kw):
        f = real(int(fd), *a, **kw)
        return F(f, fd.make_error) if isinstance(fd, _Failing) else f
    monkeypatch.setattr(os, "fdopen", fdopen)


@pytest.mark.parametrize("error, message", [
    (lambda: OSError(errno.ENOSPC, "No space left on device"), r"No space left on device, errno ENOSPC"),
    (lambda: OSError(errno.EROFS, "Read-only file system"), r"Read-only file system, errno EROFS"),
])
def test_failed_save_keeps_the_previous_checkpoint(toy, tmp_path, monkeypatch, failing_fdopen, error, message):
    out = tmp_path / "run"
    cfg = make_config("clip", overrides(toy, out))
    saved = {}
    import tbps_clip.train as tr
    real_save = tr.save_checkpoint
    def spy(path, *a, **kw):  # remember the bytes of the last complete checkpoint
        r = real_save(path, *a, **kw); saved["bytes"] = Path(path).read_bytes(); return r
    monkeypatch.setattr(tr, "save_checkpoint", spy)
    failing_on_save(monkeypatch, 4, error)
    with pytest.raises(TBPSError, match=rf"checkpoint.pt: cannot write \({message}\); the previous file is unchanged"):
        train(cfg, progress=False)
    assert (out / "checkpoint.pt").read_bytes() == saved["bytes"]  # the third checkpoint, intact
    assert read_checkpoint_file(out / "checkpoint.pt")["state"]["step"] == 3
    assert not list(out.glob(".*.tmp"))
    monkeypatch.undo()  # space again: the run resumes from step 3 and ends as an uninterrupted one
    resumed = train(cfg, progress=False, resume=True)
    base = train(make_config("clip", overrides(toy, tmp_path / "base")), progress=False)
    assert same_results(resumed["metrics"], base["metrics"])


def test_read_only_run_folder_is_a_clear_error(toy, tmp_path):
    "A run folder that cannot be written at all (here: a file is in its way) stops with the path."
    (tmp_path / "blocked").write_text("a file, not a folder")
    with pytest.raises(TBPSError, match=r"blocked"):
        train(make_config("clip", overrides(toy, tmp_path / "blocked" / "run")), progress=False)


# --- malicious checkpoints ---------------------------------------------------------------------------------------

class Payload:
    "Unpickling calls `fn(*args)`: here, something that leaves a marker file."
    def __init__(self, fn, args): self.fn, self.args = fn, args
    def __reduce__(self): return (self.fn, self.args)


def payloads(marker: Path) -> dict:
    code = f"open({str(marker)!r}, 'w').write('ran')"
    return {"os.system": Payload(os.system, (f"touch {marker}",)),
            "builtins.exec": Payload(exec, (code,)),
            "builtins.eval": Payload(eval, (code,)),
            "subprocess.Popen": Payload(subprocess.Popen, (["touch", str(marker)],))}


def evil_files(folder: Path, marker: Path) -> dict:
    "Checkpoint files that run code when unpickled, in every container torch.load reads."
    m = create_model("tbps-micro", (32, 16))
    out = {}
    for name, pl in payloads(marker).items():
        p = folder / f"{name}.pt"
        torch.save({"format": "tbps-clip-checkpoint", "identity": m.identity(), "model": m.state_dict(), "state": pl}, p)
        out[name] = p
    p = folder / "legacy.pt"  # the pre-zip torch.save format
    torch.save({"model": payloads(marker)["builtins.exec"]}, p, _use_new_zipfile_serialization=False)
    out["legacy torch.save"] = p
    p = folder / "plain.pkl"  # a bare pickle, protocol 0
    p.write_bytes(pickle.dumps(payloads(marker)["os.system"], protocol=0)); out["bare pickle"] = p
    p = folder / "with_easydict.pt"  # an allowed foreign container next to a code-running global
    import types
    EasyDict = type("EasyDict", (dict,), {"__module__": "easydict"})
    sys.modules.setdefault("easydict", types.ModuleType("easydict")).EasyDict = EasyDict
    try: torch.save({"config": EasyDict(a=1), "model": payloads(marker)["builtins.exec"]}, p)
    finally: sys.modules.pop("easydict", None)
    out["easydict + exec"] = p
    return out


def test_code_running_checkpoints_are_refused_everywhere(toy, tmp_path):
    marker = tmp_path / "marker"
    files = evil_files(tmp_path, marker)
    m = create_model("tbps-micro", (32, 16))
    for name, p in files.items():
        for what, load in [("read_checkpoint_file", lambda: read_checkpoint_file(p)),
                           ("load_weights", lambda: load_weights(m, p)),
                           ("eval", lambda: evaluate_checkpoint(str(p), micro_overrides(toy, tmp_path / "e")))]:
            with pytest.raises(TBPSError, match="refused to load|could not be read safely|not a readable checkpoint"):
                load()
            assert not marker.exists(), f"{name} via {what} ran code"
    # resuming a run whose checkpoint.pt was replaced by one of them
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(files["builtins.exec"].read_bytes())
    with pytest.raises(TBPSError, match="refused to load"):
        train(make_config("clip", overrides(toy, out)), progress=False, resume=True)
    cfg = make_config("clip", {**overrides(toy, tmp_path / "r2"), "model.pretrained": str(files["os.system"])})
    with pytest.raises(TBPSError, match="refused to load"):
        train(cfg, progress=False)
    assert not marker.exists()
    # the test can see code running: trusting the file runs it
    read_checkpoint_file(files["builtins.exec"], trust=True)
    assert marker.read_text() == "ran"


# --- checkpoints for another model --------------------------------------------------------------------------------

def test_checkpoint_for_another_architecture_is_refused_with_the_differences(tmp_path):
    save_checkpoint(tmp_path / "micro.pt", create_model("tbps-micro", (32, 16)))
    with pytest.raises(TBPSError, match=r"arch: checkpoint has 'tbps-micro', model needs 'tbps-tiny'.*image_size"):
        load_weights(create_model("tbps-tiny", (64, 32)), tmp_path / "micro.pt")
    with pytest.raises(TBPSError, match=r"context_length: checkpoint has \d+, model needs 16"):
        load_weights(create_model("tbps-micro", (32, 16), context_length=16), tmp_path / "micro.pt")


def test_checkpoint_with_another_vocabulary_is_refused_naming_it(tmp_path):
    m = create_model("tbps-micro", (32, 16))
    sd = m.state_dict()
    sd["clip.token_embedding.weight"] = sd["clip.token_embedding.weight"][:1000].clone()  # a 1,000-token vocabulary
    torch.save({"format": "tbps-clip-checkpoint", "identity": m.identity(), "model": sd}, tmp_path / "v.pt")
    with pytest.raises(TBPSError, match=r"vocabulary: the checkpoint has 1000 tokens, the model's tokenizer \d+"):
        load_weights(m, tmp_path / "v.pt")


def test_resume_with_another_architecture_is_refused(toy, tmp_path):
    out = tmp_path / "run"
    train(make_config("clip", micro_overrides(toy, out, **{"train.max_steps": 2, "train.threads": 1})), progress=False)
    cfg = make_config("clip", micro_overrides(toy, out, **{"train.max_steps": 4, "data.image_size": "[64,32]"}))
    with pytest.raises(TBPSError, match=r"image_size: checkpoint has \[32, 16\], model needs \[64, 32\]"):
        train(cfg, progress=False, resume=True)


def test_resume_from_a_weights_only_checkpoint_is_a_clear_error(toy, tmp_path):
    "A checkpoint without optimizer and trainer state (an exported model) copied into a run folder is not resumable."
    out = tmp_path / "run"
    cfg = make_config("clip", micro_overrides(toy, out, **{"train.max_steps": 2, "train.threads": 1}))
    train(cfg, progress=False)
    obj = read_checkpoint_file(out / "checkpoint.pt")
    m = create_model("tbps-micro", (32, 16))
    m.load_state_dict(obj["model"])
    save_checkpoint(out / "checkpoint.pt", m, cfg)  # weights and config only
    with pytest.raises(TBPSError, match=r"checkpoint.pt: cannot resume from it: it has no optimizer and trainer state"):
        train(cfg, progress=False, resume=True)
