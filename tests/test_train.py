"""Training end to end on a toy dataset: learning, determinism, exact resumption, results on disk."""
import json
import os
import signal

import pytest
import torch

from conftest import micro_overrides
from tbps_clip.config import load_config, make_config
from tbps_clip.core import TBPSError
from tbps_clip.run import evaluate_checkpoint, train
from tbps_clip.train import Callback, Interrupted
from tbps_clip.weights import read_checkpoint_file


def run(toy, out, **extra):
    return train(make_config("clip", micro_overrides(toy, out, **extra)), progress=False)


def weights(out):
    return read_checkpoint_file(out / "checkpoint.pt")["model"]


def test_training_learns(toy, tmp_path):
    rec = run(toy, tmp_path / "a", **{"train.epochs": 12})
    hist = json.loads((tmp_path / "a" / "history.json").read_text())["train"]
    first = sum(h["itc"] for h in hist[:6]) / 6
    last = sum(h["itc"] for h in hist[-6:]) / 6
    assert last < 0.7 * first, (first, last)
    assert rec["steps"] == 12 * (48 // 8) and rec["metrics"]["queries"] == 24 and rec["metrics"]["gallery"] == 12
    assert rec["synthetic"] is False and rec["dataset"] == "toy"


def test_same_seed_same_result(toy, tmp_path):
    a, b = run(toy, tmp_path / "a"), run(toy, tmp_path / "b")
    assert a["metrics"]["R@1"] == b["metrics"]["R@1"] and a["metrics"]["mAP"] == b["metrics"]["mAP"]
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = run(toy, tmp_path / "c", **{"train.seed": 1})
    wc = weights(tmp_path / "c")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


class Crash(Callback):
    "Simulates a crash after a given step."
    def __init__(self, at): self.at = at
    def after_batch(self, t):
        if t.step == self.at: raise KeyboardInterrupt(f"crash at step {t.step}")


class Seen(Callback):
    "Remembers the training time a resumed trainer carries from the processes before it."
    def before_fit(self, t): self.seconds = t.seconds_before


@pytest.mark.parametrize("crash_at", [5, 6, 8])  # mid-epoch, at an epoch end, just after a checkpoint
def test_resume_is_exact(toy, tmp_path, crash_at):
    extra = {"train.ckpt_every": 4, "trick.text_dropout": 0.1}  # dropout: the RNG state must be restored too
    full = run(toy, tmp_path / "full", **extra)
    cfg = make_config("clip", micro_overrides(toy, tmp_path / "cut", **extra))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, callbacks=[Crash(crash_at)])
    before = Seen()
    resumed = train(cfg, progress=False, resume=True, callbacks=[before])
    wf, wr = weights(tmp_path / "full"), weights(tmp_path / "cut")
    # the record says where it resumed, and its training time includes the interrupted process's
    assert full["resumed_from_step"] is None and 0 < resumed["resumed_from_step"] < crash_at
    assert before.seconds > 0 and resumed["train_seconds"] >= round(before.seconds, 2)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    assert resumed["metrics"] == {**full["metrics"], "encode_s": resumed["metrics"]["encode_s"],
                                  "rank_s": resumed["metrics"]["rank_s"]}
    hf = json.loads((tmp_path / "full" / "history.json").read_text())
    hr = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["step"] for h in hf["train"]] == [h["step"] for h in hr["train"]]  # no duplicated log lines


class CtrlC(Callback):
    "Sends this process SIGINT, as Ctrl-C does, while step `at` runs."
    def __init__(self, at): self.at = at
    def before_batch(self, t):
        if t.step == self.at - 1: os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def python_sigint_handler():
    "Python's own SIGINT handler while the test runs (as in a terminal; a test runner may install another)."
    prev = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, prev)


@pytest.mark.parametrize("at", [5, 6])  # mid-epoch, at an epoch end
def test_ctrl_c_saves_after_the_step_and_resumes_exactly(toy, tmp_path, python_sigint_handler, at):
    extra = {"train.ckpt_every": 0, "trick.text_dropout": 0.1}  # only epoch-end saves: the save at Ctrl-C is the interrupt's own
    full = run(toy, tmp_path / "full", **extra)
    cfg = make_config("clip", micro_overrides(toy, tmp_path / "cut", **extra))
    with pytest.raises(Interrupted) as e:
        train(cfg, progress=False, callbacks=[CtrlC(at)])
    assert (e.value.step, e.value.checkpoint) == (at, tmp_path / "cut" / "checkpoint.pt")
    assert read_checkpoint_file(e.value.checkpoint)["state"]["step"] == at
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is Python's again
    resumed = train(cfg, progress=False, resume=True)
    assert resumed["resumed_from_step"] == at
    wf, wr = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    hf = json.loads((tmp_path / "full" / "history.json").read_text())
    hr = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert hf["train"] == hr["train"] and [h["R@1"] for h in hf["eval"]] == [h["R@1"] for h in hr["eval"]]


def test_run_folder_contents(toy, tmp_path):
    rec = run(toy, tmp_path / "a", **{"train.max_steps": 3})
    out = tmp_path / "a"
    assert rec["steps"] == 3
    assert load_config(out / "config.yaml") == make_config("clip", micro_overrides(toy, out, **{"train.max_steps": 3}))
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"]["R@1"] == rec["metrics"]["R@1"] and saved["environment"]["torch"] == torch.__version__
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_eval_checkpoint_reproduces_training_metrics(toy, tmp_path):
    rec = run(toy, tmp_path / "a")
    ev = evaluate_checkpoint(str(tmp_path / "a" / "checkpoint.pt"), out=str(tmp_path / "eval.json"))
    for k in ("R@1", "R@5", "R@10", "mAP", "mINP"):
        assert ev["metrics"][k] == pytest.approx(rec["metrics"][k])
    assert json.loads((tmp_path / "eval.json").read_text())["kind"] == "eval"


def test_checkpoint_of_another_architecture_is_refused(toy, tmp_path):
    run(toy, tmp_path / "a", **{"train.max_steps": 1})
    with pytest.raises(TBPSError, match="arch: checkpoint has 'tbps-micro', model needs 'tbps-tiny'"):
        evaluate_checkpoint(str(tmp_path / "a" / "checkpoint.pt"), ["model.arch=tbps-tiny", "data.image_size=[128,64]"])


def test_batch_larger_than_dataset_is_explained(toy, tmp_path):
    with pytest.raises(TBPSError, match="fewer than one batch"):
        run(toy, tmp_path / "a", **{"data.batch_size": 500})


# ---- speed settings: plumbing on the CPU (their GPU effect is measured by benchmarks/train_step.py) ----

def trainer_for(toy, tmp_path, **extra):
    from tbps_clip.run import load_data, prepare_model, train_dataset
    from tbps_clip.train import Trainer
    cfg = make_config("clip", micro_overrides(toy, tmp_path, **{"train.device": "cpu", **extra}))
    model = prepare_model(cfg)
    return Trainer(cfg, model, train_dataset(cfg, load_data(cfg), model.image_size, model.context_length), progress=False)


def test_speed_settings_reach_the_optimizer_and_loader(toy, tmp_path):
    tr = trainer_for(toy, tmp_path)
    assert tr.opt.defaults["fused"] is True  # fused AdamW by default, the CPU included
    dl = tr.loader(0, 0)
    assert dl.num_workers == 0 and dl.prefetch_factor is None and dl.pin_memory is False  # nothing to pin on the CPU
    tr = trainer_for(toy, tmp_path, **{"optim.fused": False, "data.num_workers": 2, "data.prefetch_factor": 3})
    assert not tr.opt.defaults["fused"]
    dl = tr.loader(0, 0)
    assert dl.num_workers == 2 and dl.prefetch_factor == 3 and dl.pin_memory is False


def test_fused_and_unfused_adamw_make_the_same_updates():
    "The fused kernel is AdamW's arithmetic: same gradients, same updates up to float rounding (weights ~1e-8 apart)."
    import copy
    from tbps_clip.config import OptimConfig
    from tbps_clip.model import create_model
    from tbps_clip.train import make_optimizer
    torch.manual_seed(0)
    m = create_model("tbps-micro")
    m2 = copy.deepcopy(m)
    of, ou = make_optimizer(m, OptimConfig(lr=1e-3)), make_optimizer(m2, OptimConfig(lr=1e-3, fused=False))
    start = [p.detach().clone() for p in m.parameters()]
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        for p, q in zip(m.parameters(), m2.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        of.step(); ou.step()
    assert of.defaults["fused"] and not ou.defaults["fused"]
    for p, q, p0 in zip(m.parameters(), m2.parameters(), start):
        assert (p - p0).abs().max() > 1e-4  # both moved (lr 1e-3, three steps)
        assert torch.allclose(p, q, rtol=0, atol=1e-6)


def test_compile_setting_compiles_both_towers_in_place(toy, tmp_path):
    with pytest.raises(TBPSError, match="train.compile"):
        trainer_for(toy, tmp_path, **{"train.compile": "fast"})
    from unittest import mock
    with mock.patch("torch.compile", side_effect=lambda fn, **kw: fn) as compile_:  # compiling happens at the first call
        tr = trainer_for(toy, tmp_path, **{"train.compile": "default"})
    assert [c.kwargs for c in compile_.call_args_list] == [dict(mode="default"), dict(mode="default", dynamic=True)]
    assert all("_orig_mod" not in k for k in tr.model.state_dict())  # checkpoints keep their parameter names


def test_both_towers_use_scaled_dot_product_attention():
    "open_clip's attention blocks dispatch to F.scaled_dot_product_attention in training (one call per layer)."
    from torch.profiler import profile
    from tbps_clip.model import create_model, image_blocks, text_blocks
    m = create_model("tbps-micro").train()
    x, tok = torch.randn(2, 3, *m.image_size), torch.randint(1, 100, (2, m.context_length))
    with profile() as prof:
        m.encode_image(x).sum().backward()
    n_img = sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")
    with profile() as prof:
        m.clip.encode_text(tok).sum().backward()
    n_txt = sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")
    assert n_img == len(image_blocks(m)) and n_txt == len(text_blocks(m))


def test_callback_hooks_are_the_hooks_the_trainer_calls_and_a_misspelt_one_is_refused():
    import re
    import tbps_clip.train as train_module
    from tbps_clip.core import TBPSError
    src = open(train_module.__file__).read()
    assert set(re.findall(r'_cb\("(\w+)"\)', src)) == set(train_module.Callback.HOOKS)
    with pytest.raises(TBPSError, match="before_step is not a hook"):
        class Wrong(train_module.Callback):
            def before_step(self, trainer): pass
