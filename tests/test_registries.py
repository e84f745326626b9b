"""Registries are explicit (each holds the functions themselves, in the module that consults it; a missing name is an
error), no 'module:function' string points back up the import graph, and each loss term's declaration drives what the
data, the heads and the forward pass make for it."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tbps_clip
from conftest import micro_overrides

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import house_metrics  # noqa: E402  the one reader of the package's import graph
from tbps_clip.augment import VIEW_SOURCES, configure_pairs
from tbps_clip.config import LossConfig, make_config
from tbps_clip.core import TBPSError
from tbps_clip.data import TrainPairs
from tbps_clip.data import test_transform as make_test_transform
from tbps_clip.datasets import DATASETS, RawFormat, load_annotations, raw_formats, reader
from tbps_clip.heads import HEADS, attach_heads, forward_views, head_spec
from tbps_clip.losses import LOSSES, LossTerm, View, active_terms, compute_losses, needed_heads, needed_views
from tbps_clip.model import create_model
from tbps_clip.annotations import read_annotations, read_normalised
from tbps_clip.weights import CHECKPOINT_READERS, WEIGHT_LOADERS, read_checkpoint_file


# ---- registries --------------------------------------------------------------------------------------------

def test_every_registry_entry_is_the_function_itself():
    for name in DATASETS: assert callable(reader(name)) and not isinstance(reader(name), str)
    for f in [*CHECKPOINT_READERS, *WEIGHT_LOADERS]: assert callable(f) and f.__module__ == "tbps_clip.weights"


def test_the_dataset_table_holds_every_reader_itself():
    "One table: each name maps to the reader object (no 'module:function' string); every raw layout is a RawFormat."
    assert DATASETS["annotations"] is read_normalised and callable(DATASETS["synthpedes"])
    assert set(raw_formats()) == {"cuhk-pedes", "icfg-pedes", "rstpreid", "official"}
    assert all(isinstance(f, RawFormat) and f.key == k for k, f in raw_formats().items())
    assert [k for k, f in raw_formats().items() if f.per_split] == ["official"]


def test_missing_entries_are_clear_errors(tmp_path):
    with pytest.raises(TBPSError, match="unknown dataset 'nope'; known readers: annotations, cuhk-pedes"):
        load_annotations("nope", str(tmp_path))


def test_a_new_checkpoint_format_is_one_reader_in_the_list(monkeypatch, tmp_path):
    "The list is consulted in order at each read: a reader added to it is tried before torch.load."
    f = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, f)
    monkeypatch.setattr("tbps_clip.weights.CHECKPOINT_READERS", [lambda path, trust: {"read_by": "mine", "path": path}])
    assert read_checkpoint_file(f) == {"read_by": "mine", "path": f}


def test_lookups_need_no_import_for_its_side_effects(toy, tmp_path):
    "In a fresh interpreter: the readers and checkpoint formats work on importing the module that holds them, alone."
    code = f"""
import sys, torch
from tbps_clip.datasets import load_annotations
from tbps_clip.weights import read_checkpoint_file
from tbps_clip.data import TrainPairs
from tbps_clip.data import test_transform as make_test_transform
assert not any(m in sys.modules for m in ("tbps_clip.augment", "tbps_clip.synthpedes", "tbps_clip.run", "tbps_clip.pretrain"))
from safetensors.torch import save_file
save_file({{"w": torch.ones(2)}}, {str(tmp_path / "w.safetensors")!r})
assert torch.equal(read_checkpoint_file({str(tmp_path / "w.safetensors")!r})["w"], torch.ones(2))
assert load_annotations("annotations", annotations={str(toy)!r}).dataset == "toy"
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def import_graph() -> tuple:
    "({module: modules it imports, at module level or in a function}, [(holder, 'module:function' string, module named)]), read by house_metrics."
    edges = {m: set() for m in house_metrics._package_files(ROOT)}
    for a, b, kind in house_metrics.import_edges(ROOT):
        if kind != "string": edges[a].add(b)
    return edges, house_metrics.module_strings(ROOT)


def test_no_module_function_string_names_a_module_that_imports_its_holder():
    "A string reference never hides a cycle: the module it names does not import (directly or not) the module holding it."
    edges, strings = import_graph()
    def reach(m):
        seen, todo = set(), [m]
        while todo:
            for t in edges[todo.pop()] - seen: seen.add(t); todo.append(t)
        return seen
    assert edges["tbps_clip.datasets"] >= {"tbps_clip.annotations"} and "tbps_clip.datasets" in reach("tbps_clip.run")  # the graph is read
    assert all(t for _, _, t in strings), strings
    assert [(m, s) for m, s, t in strings if m in reach(t)] == []
    assert "tbps_clip.weights" not in reach("tbps_clip.checkpoint") and "tbps_clip.datasets" not in reach("tbps_clip.annotations")
    assert not reach("tbps_clip.probes") & {"tbps_clip.checkpoint", "tbps_clip.weights"}  # weights may import probes


def test_the_training_transform_is_the_augmentation_policy_without_any_registry(toy, tmp_path):
    "data has no transform registry to fall back from: the run's training transform is augment.image_transform."
    import tbps_clip.data as D
    assert not hasattr(D, "TRAIN_TRANSFORMS") and not hasattr(D, "train_transform")
    from tbps_clip.run import load_data, train_dataset
    cfg = make_config("simplified", micro_overrides(toy, tmp_path))
    ds = train_dataset(cfg, load_data(cfg), (32, 16), 32)
    assert "Pool" in repr(ds.transform)  # aug.image=pool of the preset, not the test transform


# ---- loss terms: one declaration drives data, heads and outputs ------------------------------------------------

def test_every_declared_head_and_view_source_exists():
    for t in LOSSES.values():
        assert t.name in {f.name for f in LossConfig.__dataclass_fields__.values()}
        for h in t.heads: assert head_spec(h) is HEADS[h]
        for v in t.views: assert v.source in VIEW_SOURCES and v.modality in ("image", "text", "fields")
    with pytest.raises(TBPSError, match="known heads"): head_spec("nope")


@pytest.mark.parametrize("name", [n for n in LOSSES])
def test_each_terms_declaration_drives_data_heads_and_outputs(toy, tmp_path, name):
    "One term switched on alone: the items carry its views, the model its heads, the outputs what it reads."
    extra = {"loss.itc": 0.0, f"loss.{name}": 1.0, "aug.image": "pool", "aug.rd": 0.3, "trick.text_dropout": 0.0}
    cfg = make_config("clip", micro_overrides(toy, tmp_path, **extra))
    term = LOSSES[name]
    assert active_terms(cfg.loss) == (term,)
    ds = configure_pairs(TrainPairs(read_annotations(toy), transform=make_test_transform((32, 16)), context_length=32), cfg, (32, 16))
    made = {**ds.extra_views, **ds.extra_texts, **ds.text_fields}
    assert list(made) == [v.key for v in needed_views((term,))] == [v.key for v in term.views]
    model = attach_heads(create_model("tbps-micro"), cfg, ds.num_classes)
    assert tuple(model.heads) == term.heads
    batch = {k: torch.stack([torch.as_tensor(ds[i][k]) for i in range(4)]) for k in ds[0]}
    out = forward_views(model, batch, cfg.loss)
    assert {v.output for v in term.views if v.modality != "fields"} <= set(out)
    assert torch.isfinite(compute_losses(out, batch, {name: 1.0})["loss"])


def test_a_new_term_needs_only_its_declaration(toy, tmp_path, monkeypatch):
    "A term added to LOSSES alone gets its views from the data and its head from attach_heads."
    ss = View("ss_image_a", "image", "simclr", "ss_image"), View("ss_image_b", "image", "simclr", "ss_image")
    new = LossTerm("ss_t", lambda o, b, c: (o["ss_image_a"] - o["ss_image_b"]).square().mean(), views=ss, heads=("ss_image",))
    monkeypatch.setitem(LOSSES, "ss_t", new)  # re-declare ss_t as another SS-I, to use its existing weight
    cfg = make_config("clip", micro_overrides(toy, tmp_path, **{"loss.ss_t": 1.0}))
    ds = configure_pairs(TrainPairs(read_annotations(toy), context_length=32), cfg, (32, 16))
    assert list(ds.extra_views) == ["ss_image_a", "ss_image_b"] and not ds.extra_texts  # no caption view any more
    model = attach_heads(create_model("tbps-micro"), cfg, ds.num_classes)
    assert list(model.heads) == ["ss_image"] and needed_heads(active_terms(cfg.loss)) == ("ss_image",)


def test_a_view_whose_head_is_undeclared_is_refused():
    with pytest.raises(TBPSError, match="ss_image"):
        LossTerm("x", lambda o, b, c: 0, views=(View("v", "image", "simclr", "ss_image"),))


def documented_floors() -> dict:
    "The floors table of docs/architecture.md: {module: floor}."
    text = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    section = text.split("\n## Floors\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", section, re.M)
    return {f"tbps_clip.{m}" if m != "tbps_clip" else m: int(f) for f, mods in rows for m in re.findall(r"`([\w.]+)`", mods)}


def test_the_documented_floors_are_the_import_graphs():
    "docs/architecture.md's floors are computed from the code's imports: every module sits above all it imports."
    edges, _ = import_graph()
    real = house_metrics.floors(ROOT)
    assert documented_floors() == real, "the table's rows are (python benchmarks/house_metrics.py --floors):\n" + house_metrics.floors_table(ROOT)
    assert all(real[t] < real[m] for m in real for t in edges[m] if t in real)


def test_no_module_imports_through_a_front_door():
    "The front doors (`tbps_clip`, `tbps_clip.synthpedes`) load their names lazily for users; the package imports them where they are defined."
    import tbps_clip.synthpedes as sp
    lazy = {"tbps_clip": set(tbps_clip._LAZY), "tbps_clip.synthpedes": set(sp._LAZY)}
    assert lazy["tbps_clip.synthpedes"] >= {"read_synthpedes", "make_synthpedes"}  # the tables are read
    pkg = Path(tbps_clip.__file__).parent
    found = []
    for p in pkg.rglob("*.py"):
        here = ".".join(p.relative_to(pkg.parent).with_suffix("").parts).removesuffix(".__init__")
        here = here if p.name == "__init__.py" else here.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level: base = ".".join(here.split(".")[:len(here.split(".")) - node.level + 1] + ([base] if base else []))
                found += [f"{p.name}:{node.lineno} {base}.{a.name}" for a in node.names if a.name in lazy.get(base, ())]
    assert found == []
