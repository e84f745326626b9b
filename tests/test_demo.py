"""The demo shows what it did: the top-5 images of a few test captions before and after fine-tuning, next to its table."""
import json

import pytest
import torch

from tbps_clip.config import make_config, parse_overrides
from tbps_clip.core import seed_everything
from tbps_clip.data import eval_split
from tbps_clip.evaluate import spread_queries, top_k
from tbps_clip.run import DEMO_BUDGET, demo, eval_config, load_data, prepare_model


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    "The demo on a small SynthPEDES with the micro model (no pretrained weights): its record and config."
    from tbps_clip.synthpedes import make_synthpedes
    w = tmp_path_factory.mktemp("demo")
    root = make_synthpedes(w / "sp", n_train_ids=20, n_val_ids=2, n_test_ids=8, progress=False)
    ov = [f"data.root={root}", "model.arch=tbps-micro", "model.pretrained=none", "data.image_size=[32,16]",
          "data.batch_size=16", "train.max_steps=20", "optim.lr=1e-3"]
    rec = demo("clip", str(w / "run"), ov, progress=False)
    return rec, make_config("clip", {**DEMO_BUDGET, "out_dir": str(w / "run"), **parse_overrides(ov)}), w / "run"


def test_demo_saves_the_retrieval_figure_next_to_its_results(tiny_demo):
    rec, cfg, out = tiny_demo
    shown = rec["retrievals"]
    assert shown["figure"] == str(out / "retrievals.png") and (out / "retrievals.png").stat().st_size > 20_000
    assert json.loads((out / "results.json").read_text())["retrievals"] == shown
    names = list(shown["examples"][0]["top_pids"])
    assert len(names) == 2 and all(n.split(" (")[0] in rec["table"] for n in names)
    n_queries = sum(len(r.captions) for r in load_data(cfg).split("test"))
    assert [e["query"] for e in shown["examples"]] == spread_queries(4, n_queries)  # spread, not picked by outcome
    assert all(len(p) == 5 for e in shown["examples"] for p in e["top_pids"].values())
    head, table = rec["summary"].split("\n", 1)  # what the README's demo table is copied from
    assert table == rec["table"] and head.startswith("SynthPEDES (synthetic) test, ")
    assert f"{rec['metrics']['queries']} queries x {rec['metrics']['gallery']} images, 20 fine-tuning steps, seed 0:" in head


def test_the_figure_shows_the_models_of_the_table(tiny_demo):
    "Rebuilt independently, the zero-shot model and the checkpoint rank as the figure says, with the table's R@1."
    rec, cfg, out = tiny_demo
    ann = load_data(cfg)
    es = eval_split(ann, "test", cfg.data.max_words)
    every = list(range(len(es.captions)))
    seed_everything(cfg.train.seed)  # the micro model starts from random weights: those `train` drew
    models = (prepare_model(cfg), prepare_model(eval_config(str(out / "checkpoint.pt"))))
    for name, model, metrics in zip(rec["retrievals"]["examples"][0]["top_pids"], models, (rec["zero_shot"], rec["metrics"])):
        top = top_k(model, ann, "test", every, k=5, data_cfg=cfg.data, precision=cfg.train.precision)
        r1 = 100 * (es.gallery_pids[top[:, 0]] == es.query_pids).float().mean().item()
        assert r1 == pytest.approx(metrics["R@1"], abs=1e-9), name
        for e in rec["retrievals"]["examples"]:
            assert e["top_pids"][name] == es.gallery_pids[top[e["query"]]].tolist(), name
            assert e["pid"] == es.query_pids[e["query"]].item()
