"""Data parallelism on the CPU with gloo: two processes of batch B against one process of batch 2B.

With global gradients the losses and the averaged gradients equal those of one process on the concatenated
batch; with the naive gather the losses are the same but the gradients are not."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import micro_overrides

B = 4  # per process


def _cfg(global_grad: bool, batch: int):
    from tbps_clip.config import make_config
    return make_config("tbps", {"model.arch": "tbps-micro", "model.pretrained": "none", "data.image_size": [32, 16],
                                "data.batch_size": batch, "trick.text_dropout": 0.0,  # no randomness in the forward
                                "trick.global_grad": global_grad, "train.device": "cpu", "train.precision": "fp32"})


def _global_batch():
    "A fixed batch of 2B samples; pids repeat within and across the two halves."
    g = torch.Generator().manual_seed(0)
    from tbps_clip.text import tokenize
    caps = ["a man in a red shirt", "a woman with a blue bag", "black pants and white shoes", "a girl in a green dress",
            "grey coat and jeans", "a person with a yellow hat", "a boy carrying a backpack", "purple top and shorts"]
    img = lambda: torch.randn(2 * B, 3, 32, 16, generator=g)
    return dict(image=img(), image_aug=img(), ss_image_a=img(), ss_image_b=img(), text=tokenize(caps, 32),
                pid=torch.tensor([0, 1, 2, 0, 3, 1, 4, 2]), index=torch.arange(2 * B))


def one_step(rank: int, world: int, global_grad: bool) -> tuple:
    "Losses (averaged over processes) and gradients of one training step of the tbps preset."
    from tbps_clip.distributed import make_gather
    from tbps_clip.heads import attach_heads
    from tbps_clip.run import prepare_model
    from tbps_clip.train import SoftLabels, Trainer
    cfg = _cfg(global_grad, 2 * B // world)
    torch.manual_seed(0)
    model = attach_heads(prepare_model(cfg), cfg, 5)
    tr = Trainer(cfg, model, list(range(64)), gather=make_gather(global_grad), rank=rank, world_size=world,
                 progress=False, callbacks=[SoftLabels(0.5)])
    tr.step = tr.steps_per_epoch  # soft-label alpha at its full 0.5
    batch = {k: v[rank * 2 * B // world:(rank + 1) * 2 * B // world] for k, v in _global_batch().items()}
    logs = tr.train_step(batch)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logs, grads


def _worker(rank: int, world: int, init_file: str, out: str):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    res = {gg: one_step(rank, world, gg) for gg in (True, False)}
    if rank == 0: torch.save(res, out)
    dist.destroy_process_group()


def test_two_processes_equal_one_process_with_global_gradients(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "res.pt")), nprocs=2, join=True)
    res = torch.load(tmp_path / "res.pt")
    torch.set_num_threads(1)
    ref_logs, ref_grads = one_step(0, 1, True)
    assert set(ref_logs) >= {"nitc", "ritc", "citc", "ss_i", "mvs_i", "loss"}
    for gg in (True, False):
        logs, grads = res[gg]
        for k in ref_logs:  # the forward pass is the same either way
            assert logs[k] == pytest.approx(ref_logs[k], rel=1e-5, abs=1e-7), (gg, k)
        assert set(grads) == set(ref_grads) and "clip.visual.conv1.weight" not in grads  # patch embedding locked
    gl, naive = res[True][1], res[False][1]
    worst = max(float((gl[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)) for n in ref_grads)
    assert worst < 1e-4, worst
    naive_gap = max(float((naive[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)) for n in ref_grads)
    assert naive_gap > 0.05, naive_gap  # the naive gather loses the other process's gradients


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_cli_matches_single_process(toy, tmp_path):
    "torchrun -m tbps_clip.cli train with 2 processes of batch 4 = one process of batch 8 (same data, same weights)."
    # Adam turns numerically-zero gradients (attention key biases) into +-lr steps of random sign; a large eps
    # keeps those at zero so that the weights can be compared
    extra = {"model.arch": "tbps-micro", "train.max_steps": 3, "trick.text_dropout": 0.0, "train.precision": "fp32",
             "train.device": "cpu", "train.eval_every": 0, "optim.eps": 1e-3}
    ov = lambda out, bs: [f"{k}={json.dumps(v) if isinstance(v, list) else v}"
                          for k, v in micro_overrides(toy, out, **{**extra, "data.batch_size": bs}).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "tbps_clip.cli", "train",
                        "--preset", "clip_star", *ov(tmp_path / "two", 4)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("preset clip_star") == 1  # only rank 0 reports
    r1 = subprocess.run([sys.executable, "-m", "tbps_clip.cli", "train", "--preset", "clip_star", *ov(tmp_path / "one", 8)],
                        env=env, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-3000:]
    from tbps_clip.weights import read_checkpoint_file
    two, one = read_checkpoint_file(tmp_path / "two" / "checkpoint.pt"), read_checkpoint_file(tmp_path / "one" / "checkpoint.pt")
    assert len(two["state"]["rank_rng"]) == 2
    for k, v in one["model"].items():
        assert torch.allclose(two["model"][k], v, rtol=1e-4, atol=1e-6), k
    rec = json.loads((tmp_path / "two" / "results.json").read_text())
    assert rec["world_size"] == 2 and "2 process(es)" in (tmp_path / "two" / "log.txt").read_text()
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())["train"]
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())["train"]
    assert [h["loss"] for h in h2] == pytest.approx([h["loss"] for h in h1], rel=1e-4)


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_stops_every_rank_when_rank_0_finds_bad_data(toy, tmp_path):
    "A missing image file: rank 0 names it and rank 1 stops with its own error saying so (not only a SIGTERM from torchrun)."
    (toy.parent / "images" / "train" / "0_0.png").unlink()
    ov = [f"{k}={v}" for k, v in micro_overrides(toy, tmp_path / "run", **{"train.device": "cpu", "train.max_steps": 2}).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "tbps_clip.cli", "train", "--preset", "clip", *ov],
                       env=env, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "images/train/0_0.png" in out, out[-3000:]
    assert "rank 1: stopped because rank 0 failed before training" in out, out[-3000:]
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
@pytest.mark.parametrize("sig, workers", [("SIGINT", 0), ("SIGTERM", 2)])
def test_ctrl_c_under_torchrun_saves_one_step_for_every_rank_and_the_run_resumes(toy, tmp_path, sig, workers):
    """A real SIGINT to torchrun's process group (Ctrl-C in a terminal), or SIGTERM (a scheduler's stop) with data-loader
    workers, which torchrun passes on to each rank's whole session: both ranks stop after the same step, rank 0 saves it
    with both ranks' RNG states and prints the torchrun command that resumes, which then finishes the run."""
    import signal
    import time
    from tbps_clip.weights import read_checkpoint_file
    run = tmp_path / "run"
    ov = lambda steps: [f"{k}={v}" for k, v in micro_overrides(toy, run, **{"train.device": "cpu", "train.max_steps": steps,
                                                                           "train.ckpt_every": 0, "data.batch_size": 4,
                                                                           "data.num_workers": workers}).items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "tbps_clip.cli", "train", "--preset", "clip"]
    p = subprocess.Popen([*cmd, *ov(300)], env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        # the first epoch's save (6 steps) means both ranks train with their handlers in place
        while not (run / "history.json").is_file() and p.poll() is None and time.monotonic() < deadline: time.sleep(0.2)
        time.sleep(1)  # some steps more
        os.killpg(p.pid, getattr(signal, sig))
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)
    ck = read_checkpoint_file(run / "checkpoint.pt")
    step = ck["state"]["step"]
    assert len(ck["state"]["rank_rng"]) == 2, err[-3000:]
    said = [l for l in err.splitlines() if l.startswith("tbps-clip: interrupted")]
    assert said == [f"tbps-clip: interrupted; saved after step {step} in {run / 'checkpoint.pt'}; resume with: "
                    f"torchrun --standalone --nproc_per_node 2 -m tbps_clip.cli train --out {run} --resume"], err[-3000:]
    assert 0 < step < 300
    resume = said[0].split("resume with: ", 1)[1].split()  # the command as printed
    r = subprocess.run([torchrun, *resume[1:]], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_checkpoint_file(run / "checkpoint.pt")["state"]["step"] == 300
    assert json.loads((run / "results.json").read_text())["resumed_from_step"] == step


def _flags_worker(rank: int, world: int, init_file: str, out: str):
    import torch.distributed as dist
    from tbps_clip.core import TBPSError
    from tbps_clip.distributed import any_rank, main_first
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    res = dict(any_of_rank1=any_rank(rank == 1), none=any_rank(False), built=main_first(lambda: f"built by {rank}"))
    def bad():
        if rank == 0: raise TBPSError("annotations.json: entry 3: no such image")
        return "never"
    try: main_first(bad)
    except TBPSError as e: res["error"] = str(e)
    torch.save(res, f"{out}.{rank}")
    dist.destroy_process_group()


def test_any_rank_and_main_first_across_two_processes(tmp_path):
    "A flag raised in rank 1 alone is seen by both; main_first builds on each rank; rank 0's error stops rank 1 with an error that says so."
    mp.spawn(_flags_worker, args=(2, str(tmp_path / "pg"), str(tmp_path / "res")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"res.{r}") for r in (0, 1))
    assert r0["any_of_rank1"] and r1["any_of_rank1"] and not r0["none"] and not r1["none"]
    assert (r0["built"], r1["built"]) == ("built by 0", "built by 1")
    assert r0["error"] == "annotations.json: entry 3: no such image"
    assert r1["error"] == "rank 1: stopped because rank 0 failed before training: TBPSError: annotations.json: entry 3: no such image"
