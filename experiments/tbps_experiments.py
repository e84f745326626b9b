"""Code that belongs to one experiment, beside its notebook: e06's backbones, e07's cost table, e08's initialisations,
e09's fractions and methods, e10's module scores, e11's layers and rows, e12's batch rows and e13's regime map, each
with the groups or lines it adds to the e99 report.

The experiment notebooks import it (the driver makes this folder importable from their kernels, as JupyterLab does);
the library (`tbps_clip.study.*`) knows nothing of it: e99 passes `REPORT_SECTIONS` to `build_report`.
"""
from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tbps_clip.config import PRESETS, config_from_dict, make_config, parse_overrides
from tbps_clip.core import TBPSError, atomic_write_json, git_commit, resolve_device, seed_everything
from tbps_clip.evaluate import evaluate
from tbps_clip.heads import attach_heads
from tbps_clip.metrics import METRICS
from tbps_clip.importance import ALPHAS, TOWERS, layer_importance, least_important_layers, module_importance, module_refs
from tbps_clip.data import fewshot_subset
from tbps_clip.probes import TABLE12_LAYERS, trainable_parameters
from tbps_clip.model import configured_model
from tbps_clip.run import eval_config, load_data, prepare_model, set_threads, train_dataset
from tbps_clip.study.marks import HIGHER, LOWER, NO_CHANGE, renamed, summarise
from tbps_clip.study.paper import PAPER, dataset_paper_rows, paper_dataset
from tbps_clip.study.report import data_label, group, study_marks, table_group, to_markdown, write_csv, write_group
from tbps_clip.study.runs import load_records, record_path, run_dir_of, run_once, run_pending, run_rows
from tbps_clip.train import Trainer

def study_sd(out, metric: str = "R@1", recs: list | None = None) -> tuple:
    """(the pooled paired sd, its degrees of freedom) with which the e99 report marks the results folder `out`: one for the
    whole study (`recs`: its records, when the caller has read them)."""
    from tbps_clip.study.marks import pooled_paired_sd
    from tbps_clip.study.report import study_groups
    recs = load_records(out) if recs is None else recs
    groups, _ = study_groups(recs, out, None, data_label(recs), metric, 2.0, False, REPORT_SECTIONS)  # out None: nothing written
    return pooled_paired_sd([(g["records"], s["row"], s["against"]) for g in groups for s in g["specs"]], metric)

def marks_in_study(out, groups, metric: str = "R@1", k: float = 2.0, write: bool = True, recs: list | None = None) -> dict:
    """{stem: marked comparisons} of `groups`, marked with the study sd of the results folder `out` (as the e99 report
    marks them); each written to out/tables/<stem>.md and .csv."""
    from tbps_clip.study.marks import compare
    sd, _ = study_sd(out, metric, recs)
    marks = {g["stem"]: compare(g["records"], g["specs"], sd, metric, k) for g in groups}
    if write:
        for g in groups: write_group(g, marks[g["stem"]], out, data_label(g["records"]) if g["records"] else "no runs", metric, k, figures=False)
    return marks

def notebook_marks(out, table: str, metric: str = "R@1", k: float = 2.0) -> list:
    "The marked comparisons of a paper table keyed by our row names (Tables 1-5, their appendices, the batch size) in `out`."
    from tbps_clip.study.report import table_group, table_records
    recs = load_records(out)  # read once: for the table and for the study's sd
    return marks_in_study(out, [table_group(table_records(recs, table), table, metric)], metric, k, recs=recs)[table]


# ---- e06: main results, presets x backbones (Tables 6-8) ------------------------------------------------------------

def e06_paper_rows(dataset: str, backbone: str) -> dict:
    "The Tables 6-8 rows of `dataset` and `backbone` (paper names), keyed by preset."
    rows = PAPER["table6_8"]["rows"]
    out = {k.split("/")[1]: v for k, v in rows.items() if k.startswith(f"{dataset}/") and k.endswith(f"/{backbone}")}
    if not out: raise TBPSError(f"Tables 6-8 have no rows for {dataset} {backbone}; datasets cuhk-pedes, icfg-pedes, rstpreid; "
                                "backbones ViT-B-32, ViT-B-16")
    return out

def paper_backbone(arch: str, mapping: dict | None = None) -> str:
    "The paper's backbone that our `arch` is compared with: `mapping`'s, else itself for a ViT-B, else ViT-B/16 (ours are smaller)."
    return (mapping or {}).get(arch) or (arch if arch.startswith("ViT-B") else "ViT-B-16")

def e06_groups(records, paper_rows_of: str, paper_backbones: dict | None = None, metric: str = "R@1") -> list:
    "Per backbone, each preset against clip, beside the paper's rows of dataset `paper_rows_of` and the mapped paper backbone."
    groups = []
    for arch in dict.fromkeys(r["config"]["model"]["arch"] for r in records):
        sub = [renamed(r, r["name"].split("@")[0]) for r in records if r["config"]["model"]["arch"] == arch]
        pb = paper_backbone(arch, paper_backbones)
        groups.append(table_group(sub, "table6_8", metric, paper_rows=e06_paper_rows(paper_rows_of, pb), baseline="clip",
                                  stem=f"table6_8-{arch}", title=f"Tables 6-8: main results, ours {arch} (paper: {paper_rows_of}, {pb})"))
    return groups

def e06_section(recs, out, src, label, metric="R@1", **kw) -> tuple:
    "The report's Tables 6-8: our backbones compared with ViT-B/16 (ours are smaller), or a ViT-B with itself."
    e06 = [r for r in recs if r["exp"] == "e06"]
    if not e06: return [], []
    return e06_groups(e06, paper_dataset(e06[0]["dataset"]), None, metric), []


# ---- e07: training cost (Table 9) -------------------------------------------------------------------------------------

def interleaved_step_seconds(rows: dict, base: dict, rounds: int = 8, threads: int = 1) -> dict:
    """Median seconds of one training step (loading, augmentation and tokenising included) of each row {name: (preset,
    overrides)}, timed in this process one step at a time and in turn (A, B, A, B, ...), after one warm-up step each:
    every row sees the same machine and the same load. Random weights: cost does not depend on them."""
    torch.set_num_threads(threads)
    steppers, times = {}, {name: [] for name in rows}
    for name, (preset, ov) in rows.items():
        tr = timing_trainer(preset, {**base, **ov}, threads)
        steppers[name] = (tr, _endless_batches(tr))
    for r in range(rounds + 1):
        for name, (tr, it) in steppers.items():
            t0 = time.perf_counter(); tr.train_step(next(it)); dt = time.perf_counter() - t0
            if r: times[name].append(dt)  # round 0 is the warm-up
    return {name: statistics.median(t) for name, t in times.items()}

def timing_trainer(preset: str, overrides: dict, threads: int = 1) -> Trainer:
    "A trainer of `preset` with `overrides` on random weights (cost does not depend on them), for timing its steps."
    cfg = make_config(preset, {**overrides, "model.pretrained": "none", "train.threads": threads,
                               "out_dir": tempfile.mkdtemp(prefix="timing-")})
    model = configured_model(cfg)
    ds = train_dataset(cfg, load_data(cfg), model.image_size, model.context_length)
    attach_heads(model, cfg, ds.num_classes)
    return Trainer(cfg, model, ds, progress=False)

def _endless_batches(tr):
    "The trainer's batches, epoch after epoch."
    epoch = 0
    while True:
        yield from tr.loader(epoch, 0)
        epoch += 1

def cost_rows(records, step_seconds: dict | None = None) -> list:
    """e07 rows (ours, then the paper's Table 9) with parameters, epochs, train and test time, hardware; with `step_seconds`
    (from `interleaved_step_seconds`) also each row's train time timed alone: the median step times its steps."""
    ours = []
    for r in records:
        env = r.get("environment") or {}
        hw = env.get("cuda") or f"CPU, {env.get('cpu_count')} cores, {env.get('torch_threads')} threads"
        row = dict(method=f"{r['name']} ({data_label([r])}, seed {r['seed']})", params_m=r.get("params_m"),
                   trainable_m=r.get("trainable_m"), epochs=r.get("epochs"), steps=r.get("steps"),
                   train_seconds=r.get("train_seconds"), test_seconds=r.get("test_seconds"), hardware=hw)
        if step_seconds and r["name"] in step_seconds:
            row["train_seconds_alone"] = round(step_seconds[r["name"]] * (r.get("steps") or 0), 1)
        ours.append(row)
    return ours + [dict(method=f"{m} (paper)", hardware="paper (TBPS-CLIP: 4 GPUs)" if m == "TBPS-CLIP" else "paper", **v)
                   for m, v in PAPER["table9"]["rows"].items()]

TIMING_FILE = "table9_timing.json"  # under out/tables: e07's interleaved step times, read by the report

def e07_section(recs, out, src, label, **kw) -> tuple:
    "The report's Table 9: our cost beside the paper's (different hardware and data sizes)."
    e07 = [r for r in recs if r["exp"] == "e07"]
    if not e07: return [], []
    timing_path = Path(src) / "tables" / TIMING_FILE  # written by e07 beside its records, not under the report
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    rows = cost_rows(e07, timing.get("step_seconds"))
    if out is not None: write_csv(rows, out / "tables" / "table9.csv")
    note = ([f"`train_seconds` is each run's own wall time, taken while other runs shared the machine; `train_seconds_alone` is "
             f"its median step timed alone and interleaved with the other rows ({timing['rounds']} steps each, "
             f"{timing['threads']} thread(s), {timing['machine']}, load average {timing['load_average']}) times its steps.", ""]
            if timing else [])
    return [], ["### Table 9: training cost (ours vs the paper; different hardware and data sizes)", "", to_markdown(rows), "", *note]


# ---- e08: IRRA from three initialisations (Table 10) ------------------------------------------------------------------

IRRA_INITS = ("clip", "tbps", "simplified")  # 'clip': the scale's weights; a preset: a checkpoint of that preset trained first

def irra_init_runs(inits, seeds, scale: str, out, overrides=None, nproc: int = 1, log=print) -> list:
    "e08: the `irra` preset from each of `inits` ('clip': the scale's weights; a preset: its `source@preset` checkpoint) at each seed."
    ov = dict(parse_overrides(overrides))
    bad = [i for i in inits if i != "clip" and i not in PRESETS]
    if bad: raise TBPSError(f"e08: unknown initialisation(s) {', '.join(map(str, bad))}; 'clip' or a preset: {', '.join(PRESETS)}")
    call = lambda name, preset, o, seed, **kw: dict(exp="e08", name=name, preset=preset, overrides=o, seed=seed, scale=scale,
                                                    out=str(out), nproc=nproc, **kw)
    # a source is trained only while the IRRA run it starts is not yet recorded; several at once under --jobs or Slurm
    run_pending([call(f"source@{i}", i, ov, s, keep_checkpoint=True) for s in seeds for i in inits
                 if i != "clip" and not record_path(out, "e08", i, s).exists()], log=log)
    plan = []
    for seed in seeds:
        for init in inits:
            row = {}
            if init != "clip":
                src = f"source@{init}"
                ckpt = run_dir_of(out, "e08", src, seed) / "checkpoint.pt"
                if not record_path(out, "e08", init, seed).exists():  # the IRRA run still needs its initialisation
                    s = run_once("e08", src, init, ov, seed, scale, out, nproc=nproc, keep_checkpoint=True)
                    if log: log(f"e08 {src} seed {seed}: R@1 {s['metrics']['R@1']:.2f} (checkpoint {ckpt})")
                    if not ckpt.is_file():
                        raise TBPSError(f"{record_path(out, 'e08', src, seed)}: its checkpoint {ckpt} is gone; "
                                        "delete that record to train the initialisation again")
                row = {"model.pretrained": str(ckpt)}
            plan.append((seed, init, row))
    run_pending([call(init, "irra", {**ov, **row}, seed) for seed, init, row in plan], log=log)
    return [rec for seed, init, row in plan for rec in run_rows("e08", {init: ("irra", row)}, [seed], scale, out, ov, nproc=nproc, log=log)]

def e08_section(recs, out, src, label, metric="R@1", **kw) -> tuple:
    "The report's Table 10: IRRA from TBPS-CLIP and Simplified against IRRA from CLIP, beside the paper's dataset."
    e08 = [r for r in recs if r["exp"] == "e08" and r["name"] in IRRA_INITS]
    if not e08: return [], []
    pds = paper_dataset(e08[0]["dataset"])
    steps = e08[0].get("steps")
    note = (f"IRRA from TBPS-CLIP or Simplified starts from that preset's own fine-tuned checkpoint (its `source@` run: "
            f"{steps} steps at the same seed) and then has its own {steps} steps, as in the paper (IRRA initialised from a "
            f"TBPS-CLIP trained on the benchmark); IRRA from CLIP has only its own {steps}: the compared rows differ in total "
            "fine-tuning, by design.")
    g = table_group(e08, "table10", metric, paper_rows=dataset_paper_rows("table10", pds), baseline="clip",
                    title=f"{PAPER['table10']['title']} (paper: {pds})")
    return [dict(g, note=note)], []


# ---- e09: few-shot (Table 11) -----------------------------------------------------------------------------------------

FEWSHOT_METHODS = {"clip": ("clip", {}), "coop": ("clip", {"model.probe": "coop"}), "adapter": ("clip", {"model.probe": "adapter"}),
                   "tbps": ("tbps", {}), "simplified": ("simplified", {})}

def fewshot_rows(fractions, methods=None) -> dict:
    "e09 rows `method@fraction`: each method of `FEWSHOT_METHODS` trained on `fraction` of the training identities."
    methods = list(FEWSHOT_METHODS) if methods is None else list(methods)
    bad = [m for m in methods if m not in FEWSHOT_METHODS]
    if bad: raise TBPSError(f"e09: unknown method(s) {', '.join(map(str, bad))}; known: {', '.join(FEWSHOT_METHODS)}")
    fr = [float(f) for f in fractions]
    if any(not 0 < f <= 1 for f in fr): raise TBPSError(f"e09: fractions {list(fractions)} must lie in (0, 1]")
    return {f"{m}@{f:g}": (FEWSHOT_METHODS[m][0], {**FEWSHOT_METHODS[m][1], "data.fewshot": f}) for f in fr for m in methods}

def e09_groups(records, metric: str = "R@1") -> list:
    "Per few-shot fraction, each method against CLIP fine-tuning on that fraction (Table 11)."
    paper, groups = PAPER["table11"]["rows"], []
    for f in dict.fromkeys(r["name"].split("@")[1] for r in records):
        sub = [renamed(r, r["name"].split("@")[0]) for r in records if r["name"].split("@")[1] == f]
        prow = {n.split("@")[0]: v for n, v in paper.items() if n.split("@")[1] == f}
        groups.append(table_group(sub, "table11", metric, paper_rows=prow, baseline="clip", stem=f"table11-{f}",
                                  title=f"Table 11: few-shot, {float(f):.0%} of the training identities: each method vs CLIP fine-tuning"))
    return groups

def e09_section(recs, out, src, label, metric="R@1", **kw) -> tuple:
    "The report's Table 11: each method vs CLIP fine-tuning on the same fraction of the training identities."
    e09 = [r for r in recs if r["exp"] == "e09"]
    return (e09_groups(e09, metric) if e09 else []), []


# ---- e10: module importance (C1, C2) ----------------------------------------------------------------------------------

def importance_path(out, preset: str, seed: int) -> Path:
    "Where e10 keeps the module scores of the fine-tuned `preset` at `seed`."
    return Path(out) / "importance" / f"e10-{preset}-s{seed}.json"

def score_modules(checkpoint, config: dict, split: str = "val", fraction: float = 1.0, eps: float = 3.0, grid=None,
                  metric: str = "R@1") -> list:
    "C1 and C2 of every module of the model in `checkpoint` against the weights its run (`config`) started from, on `split`."
    cfg = config_from_dict(config)
    set_threads(cfg)
    ann = load_data(cfg)
    seed_everything(cfg.train.seed)  # as run.train does right before building the model: the same theta_0, random or not
    theta0 = {k: v.detach().clone() for k, v in prepare_model(cfg).state_dict().items()}
    device = resolve_device(cfg.train.device)
    model = prepare_model(eval_config(str(checkpoint))).to(device)
    if not ann.split(split): raise TBPSError(f"{cfg.data.dataset} ({cfg.data.root}): split {split!r} is empty; choose another split")
    if fraction < 1: ann, _ = fewshot_subset(ann, fraction, cfg.data.fewshot_seed, split=split)
    ev = lambda m: evaluate(m, ann, split, cfg.data, cfg.eval.chunk_size, device, cfg.train.precision)
    rows = []
    for tower in TOWERS:  # C1 is normalised over the modules scored together: one tower, one heatmap
        rows += module_importance(model, ev, theta0, module_refs(model, (tower,)), eps, ALPHAS if grid is None else grid, metric)
    return rows

def importance_run(preset: str, seed: int, scale: str, out, overrides=None, split: str = "val", fraction: float = 1.0,
                   eps: float = 3.0, grid=None, metric: str = "R@1", nproc: int = 1, log=print) -> dict:
    "e10: fine-tune `preset` (checkpoint kept) and score its modules; the saved scores (read back when already there)."
    settings = dict(split=split, fraction=float(fraction), eps=float(eps), grid=[float(a) for a in (ALPHAS if grid is None else grid)],
                    metric=metric)
    rec = run_once("e10", preset, preset, overrides, seed, scale, out, nproc=nproc, keep_checkpoint=True)
    path = importance_path(out, preset, seed)
    if path.exists():
        res = json.loads(path.read_text())
        if res.get("settings") != settings or res.get("fingerprint") != rec["fingerprint"]:
            raise TBPSError(f"{path}: scores of other settings or another run are there ({res.get('settings')}); "
                            "delete the file or use another out folder")
        return res
    ckpt = run_dir_of(out, "e10", preset, seed) / "checkpoint.pt"
    if not ckpt.is_file():
        raise TBPSError(f"{record_path(out, 'e10', preset, seed)}: its checkpoint {ckpt} is gone; delete that record to train it again")
    t0 = time.perf_counter()
    rows = score_modules(ckpt, rec["config"], split, fraction, eps, settings["grid"], metric)
    res = dict(exp="e10", name=preset, seed=seed, scale=scale, dataset=rec["dataset"], synthetic=rec["synthetic"],
               arch=rec["config"]["model"]["arch"], fingerprint=rec["fingerprint"], settings=settings, baseline=rows[0]["baseline"],
               evaluations=sum(len(r["curve"]) for r in rows) + 2, seconds=round(time.perf_counter() - t0, 1), rows=rows,
               git_commit=git_commit(), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(path, res)
    if log: log(f"e10 {preset} seed {seed}: {len(rows)} modules scored on {split} in {res['seconds']:.0f} s ({res['evaluations']} evaluations)")
    return res

def importance_runs(preset: str, seeds, scale: str, out, overrides=None, split: str = "val", fraction: float = 1.0,
                    eps: float = 3.0, grid=None, metric: str = "R@1", nproc: int = 1, log=print) -> list:
    "e10 at every seed: the fine-tuning runs first (several at once under --jobs or Slurm), then each one's scores."
    run_pending([dict(exp="e10", name=preset, preset=preset, overrides=dict(parse_overrides(overrides)), seed=s, scale=scale,
                      out=str(out), nproc=nproc, keep_checkpoint=True) for s in seeds], log=log)
    return [importance_run(preset, s, scale, out, overrides, split, fraction, eps, grid, metric, nproc, log) for s in seeds]

def e10_section(recs, out, src, label, **kw) -> tuple:
    "The report's module importance: our text layers from least to most important, beside the paper's order."
    md = []
    for f in sorted((src / "importance").glob("e10-*.json")):
        res = json.loads(f.read_text())
        sc = layer_importance(res["rows"], "text")
        order = sorted(sc, key=lambda l: (sc[l], l))
        md += [f"### e10: module importance of {res['name']} seed {res['seed']} ({res['arch']}; ours {label}; {res['settings']['split']} split)", "",
               f"Text layers from least to most important (summed C1 + C2 of SA, FF, layer; 0-based): {', '.join(map(str, order))}. "
               f"The paper (ViT-B/16, 12 text layers) drops or freezes, in that order: 7, 8, 3, 5, 6 (Table 12).", ""]
    return [], md


# ---- e11: text layers dropped or frozen (Table 12) --------------------------------------------------------------------

TABLE12_IDS = {x: ids for x, ids in TABLE12_LAYERS.items() if x}  # the paper's dropped/frozen text layers (x >= 1)

def compression_rows(layers: dict, preset: str = "tbps") -> dict:
    "e11 rows: `full` (x = 0), and for each x -> text-layer ids in `layers`, `drop@x` and `freeze@x`."
    rows = {"full": (preset, {})}
    for x, ids in layers.items():
        ids = sorted(int(i) for i in ids)
        if len(ids) != int(x): raise TBPSError(f"e11: x={x} needs {x} layer ids, got {ids}")
        if not ids: continue
        rows[f"drop@{x}"] = (preset, {"model.drop_text_layers": ids})
        rows[f"freeze@{x}"] = (preset, {"train.freeze_text_layers": ids})
    return rows

def compression_layers(scores: dict, xs) -> tuple:
    "({x: the x least important text layers} for each x of `xs` that leaves a layer, [the xs that do not])."
    scores = {int(l): v for l, v in scores.items()}
    ok = [int(x) for x in xs if 0 < int(x) < len(scores)]
    return {x: least_important_layers(scores, x) for x in ok}, [x for x in xs if int(x) not in ok]

def compression_table(records, metric: str = "R@1") -> list:
    "e11 per row: the layers dropped or frozen, mean `metric` over seeds and our model's exact trainable parameters."
    summ = {r["name"]: r for r in summarise(records)}
    by = {r["name"]: r for r in records}
    out = []
    for name, r in sorted(summ.items(), key=lambda kv: (kv[0] != "full", int(kv[0].split("@")[1]) if "@" in kv[0] else 0, kv[0])):
        cfg = config_from_dict(by[name]["config"])
        ids = list(cfg.model.drop_text_layers or cfg.train.freeze_text_layers)
        out.append(dict(name=name, label=f"{name.split('@')[0]} {ids}" if ids else "full (x = 0)", n=r["n"], ours=r[metric],
                        ours_sd=r.get(f"{metric}_sd"), trainable=trainable_parameters(cfg, by[name]["train_ids"])["trainable"]))
    return out

def compression_specs(names) -> list:
    """e11's comparisons, as the paper makes them (its R@1 is a figure): drop@x against the full model (dropping lowers
    R@1), freeze@x against the full model (freezing barely changes it); freeze@x against drop@x as an extra row, not counted."""
    xs = sorted({int(n.split("@")[1]) for n in names if "@" in n})
    specs = []
    for x in xs:
        if f"drop@{x}" in names: specs.append(dict(row=f"drop@{x}", against="full", paper=LOWER, label=f"drop@{x} vs full"))
        if f"freeze@{x}" in names: specs.append(dict(row=f"freeze@{x}", against="full", paper=NO_CHANGE, label=f"freeze@{x} vs full"))
        if f"freeze@{x}" in names and f"drop@{x}" in names:
            specs.append(dict(row=f"freeze@{x}", against=f"drop@{x}", paper=HIGHER, label=f"freeze@{x} vs drop@{x} (extra)",
                              name=f"freeze@{x}-vs-drop", counted=False))
    return specs

def e11_section(recs, out, src, label, metric="R@1", **kw) -> tuple:
    "The report's Table 12: x text layers dropped or frozen against the full model, with exact trainable parameters."
    e11 = [r for r in recs if r["exp"] == "e11"]
    if not e11: return [], []
    rows = compression_table(e11, metric)
    if out is not None: write_csv(rows, out / "tables" / "table12.csv")
    arch = ", ".join(sorted({r["config"]["model"]["arch"] for r in e11}))
    g = group("table12", e11, compression_specs({r["name"] for r in e11}),
              title=f"Table 12: x text layers dropped or frozen, against the full model (ours {arch})",
              note="The paper's R@1 is a figure: dropping lowers it, freezing barely changes it; freeze vs drop is shown as an extra row and not counted.")
    lines = [f"Table 12's runs: mean {metric} and our model's exact trainable parameters ({arch}); the paper's ViT-B/16 counts (M) beside "
             "ours counted on ViT-B/16 are e11's tables/table12_vit_b16.csv.", "",
             to_markdown(rows, ["label", "n", "ours", "ours_sd", "trainable"]), ""]
    return [g], lines


# ---- e12: the batch size (the authors' answer) ------------------------------------------------------------------------

def batch_size_rows(batch: int, steps: int) -> dict:
    "e12: half vs full global batch at equal epochs (half gets twice the steps), and full batch by gradient caching in halves."
    if batch < 2 or batch % 2: raise TBPSError(f"e12: the global batch must be even and >= 2, got {batch}")
    half = {"data.batch_size": batch // 2, "train.grad_cache_chunk": 0}
    if steps: half["train.max_steps"] = 2 * steps
    return {"half": ("simplified", half), "full": ("simplified", {"data.batch_size": batch, "train.grad_cache_chunk": 0}),
            "full_gc": ("simplified", {"data.batch_size": batch, "train.grad_cache_chunk": batch // 2})}


# the e99 report's sections beyond the tables marked generically, in the report's order
REPORT_SECTIONS = (e06_section, e07_section, e08_section, e09_section, e10_section, e11_section)


# ---- e13: the regime map (ours): each preset's effect over clip against how well clip fits its training identities ----

MAP_PRESETS = ("clip_star", "simplified", "tbps")

def training_identities(overrides) -> int:
    "How many training identities the data that `overrides` configures holds."
    return len({r.pid for r in load_data(make_config("clip", overrides)).split("train")})

def regime_rows(presets, ids, n_ids: int) -> dict:
    "Rows `preset@N`: `preset` trained on N of the `n_ids` training identities (the nested seed-0 few-shot draw; N = n_ids: all)."
    bad = [n for n in ids if not 0 < n <= n_ids]
    if bad: raise TBPSError(f"ids {bad}: each N must lie in 1..{n_ids} (the training identities of this data)")
    return {f"{p}@{n}": (p, {"data.fewshot": 0.0 if n == n_ids else n / n_ids}) for p in presets for n in ids}

def paper_preset_effects(metric: str = "R@1") -> dict:
    "The paper's effect of each preset over CLIP: CLIP* from Table 1 (CUHK-PEDES, ViT-B/32), the others from Table 6 (ViT-B/16)."
    t1, t6 = PAPER["table1"]["rows"], e06_paper_rows("cuhk-pedes", "ViT-B-16")
    return {"clip_star": t1["clip_star"][metric] - t1["clip"][metric],
            **{p: t6[p][metric] - t6["clip"][metric] for p in ("simplified", "tbps")}}

def regime_effects(records, baseline: str = "clip", metric: str = "R@1", k: float = 2.0) -> list:
    """Per N and preset: the paired effect over `baseline` (mean over seeds of row minus baseline), its SE (the paired sd
    pooled over the presets at that N, over sqrt(seeds)), and the baseline's and the row's fit."""
    from tbps_clip.study.marks import compare, pooled_paired_sd
    by_n: dict = {}
    for r in records:
        preset, n = r["name"].rsplit("@", 1)
        by_n.setdefault(int(n), []).append(renamed(r, preset))
    out = []
    for n in sorted(by_n):
        recs = by_n[n]
        base_fit = [r["fit"]["R@1"] for r in recs if r["name"] == baseline and r.get("fit")]
        specs = [dict(row=p, against=baseline, paper=None) for p in dict.fromkeys(r["name"] for r in recs) if p != baseline]
        sd, _ = pooled_paired_sd([(recs, s["row"], s["against"]) for s in specs], metric)
        for m in compare(recs, specs, sd, metric, k):
            if m["ours_effect"] is None: continue
            out.append(dict(N=n, preset=m["row"], n=m["n"], effect=m["ours_effect"], se=m["se"],
                            resolved=m["se"] is not None and abs(m["ours_effect"]) > k * m["se"], fit=m["fit"],
                            clip_fit=statistics.mean(base_fit) if base_fit else None,
                            clip_fit_sd=statistics.stdev(base_fit) if len(base_fit) > 1 else None))
    return out

def fit_rule(records, threshold: float = 90.0, baseline: str = "clip") -> dict:
    "N*: the largest N at which `baseline`'s mean fit (R@1 on the fit probe) over its seeds is at least `threshold`; the rows that chose it."
    fits: dict = {}
    for r in records:
        preset, n = r["name"].rsplit("@", 1)
        if preset == baseline and r.get("fit"): fits.setdefault(int(n), []).append(r["fit"]["R@1"])
    means = {n: statistics.mean(v) for n, v in sorted(fits.items())}
    ok = [n for n, v in means.items() if v >= threshold]
    return dict(threshold=threshold, n_star=max(ok) if ok else None, clip_fit=means,
                seeds={n: len(v) for n, v in sorted(fits.items())})

def sign_change(rows, preset: str, k: float = 2.0) -> dict:
    """Where `preset`'s mean effect first turns from positive to non-positive as N grows (linear interpolation in N), and
    the bracket the resolved rows give: positive beyond k SE up to one N, negative beyond k SE from another."""
    rs = sorted((r for r in rows if r["preset"] == preset), key=lambda r: r["N"])
    cross = next((a["N"] + (b["N"] - a["N"]) * a["effect"] / (a["effect"] - b["effect"])
                  for a, b in zip(rs, rs[1:]) if a["effect"] > 0 >= b["effect"]), None)
    pos = [r["N"] for r in rs if r["se"] is not None and r["effect"] > k * r["se"]]
    neg = [r["N"] for r in rs if r["se"] is not None and r["effect"] < -k * r["se"]]
    if cross is None:
        where = ("positive at every N" if all(r["effect"] > 0 for r in rs) else "not positive at any N"
                 if all(r["effect"] <= 0 for r in rs) else "rises above 0 as N grows")
    else: where = "changes sign"
    return dict(preset=preset, sign_change_N=cross, where=where,
                positive_resolved_up_to=max((n for n in pos if cross is None or n <= cross), default=None),
                negative_resolved_from=min((n for n in neg if cross is None or n >= cross), default=None))

def _ranks(xs: list) -> list:
    "Ranks 1..n of `xs`, ties given their mean rank."
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]: j += 1
        for t in range(i, j + 1): ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks

def spearman(xs: list, ys: list) -> float | None:
    "Spearman's rank correlation of two equally long lists (None when either is constant or has fewer than 3 values)."
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2: return None
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return num / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))

def regime_readings(rows, presets, k: float = 2.0, min_corr: float = 0.6) -> dict:
    """The map's readings, as fixed in its parameter file before its runs. Per preset: supported when its effect at the
    smallest N is positive beyond k SE and its effect rises with clip's fit (Spearman >= `min_corr` over the Ns);
    refuted when the effect at the smallest N is not positive or the correlation is not positive; else inconclusive."""
    out = {}
    for p in presets:
        rs = sorted((r for r in rows if r["preset"] == p), key=lambda r: r["N"])
        if not rs: out[p] = dict(reading="not run"); continue
        first = rs[0]
        pairs = [(r["clip_fit"], r["effect"]) for r in rs if r["clip_fit"] is not None]
        rho = spearman([a for a, _ in pairs], [b for _, b in pairs])
        if first["effect"] <= 0 or (rho is not None and rho <= 0): reading = "refuted"
        elif first["se"] is not None and first["effect"] > k * first["se"] and rho is not None and rho >= min_corr: reading = "supported"
        else: reading = "inconclusive"
        out[p] = dict(reading=reading, effect_at_smallest_N=first["effect"], se_at_smallest_N=first["se"], spearman_fit_effect=rho,
                      Ns=[r["N"] for r in rs])
    return out

def plot_regime_map(rows, paper: dict, path, title: str, k: float = 2.0) -> Path:
    "Each preset's paired effect over clip with k SE against clip's fit at each N (left) and against N (right); the paper's effect dashed."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    for i, p in enumerate(presets):
        rs = sorted((r for r in rows if r["preset"] == p), key=lambda r: r["N"])
        color = f"C{i}"
        for ax, x in ((axes[0], [r["clip_fit"] for r in rs]), (axes[1], [r["N"] for r in rs])):
            ax.errorbar(x, [r["effect"] for r in rs], yerr=[k * r["se"] if r["se"] is not None else 0 for r in rs],
                        fmt="o-", capsize=3, color=color, label=p)
            if p in paper: ax.axhline(paper[p], ls="--", lw=1, color=color, alpha=0.7)
        for r in rs: axes[0].annotate(f"{r['N']}", (r["clip_fit"], r["effect"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for ax in axes: ax.axhline(0, color="k", lw=0.8)
    axes[0].set_xlabel("clip's fit: R@1 on the fit probe of training identities (%)")
    axes[1].set_xlabel("training identities N"); axes[1].set_xscale("log")
    axes[1].set_xticks(sorted({r["N"] for r in rows}), [str(n) for n in sorted({r["N"] for r in rows})])
    axes[0].set_ylabel(f"effect over clip, R@1 points (bars: {k:g} SE)")
    axes[0].legend(fontsize=8, title="dashed: the paper's effect", title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120); plt.close(fig)
    return path

def same_runs_elsewhere(records, other_out, metrics=METRICS) -> list:
    "Each record with a run of identical settings and seed under `other_out` (e.g. v3's): both metrics, and whether they are equal."
    from tbps_clip.study.runs import config_difference, load_records
    others = [o for o in load_records(other_out) if not o.get("reused_from")]
    out = []
    for r in records:
        same = next((o for o in others if o["seed"] == r["seed"] and not config_difference(o["config"], r["config"])), None)
        if same is None: continue
        out.append(dict(name=r["name"], seed=r["seed"], there=f"{same['exp']}/{same['name']}", commit_there=same.get("git_commit"),
                        commit_here=r.get("git_commit"), equal=all(same["metrics"][m] == r["metrics"][m] for m in metrics),
                        **{f"{m} here": r["metrics"][m] for m in metrics[:1]}, **{f"{m} there": same["metrics"][m] for m in metrics[:1]}))
    return out

# ---- study v4 against v3: the reading fixed in synthpedes-v4-study.yaml before v4's first run -------------------------

MAIN_ABLATIONS = "all ablations (main tables, presets, batch size)"

def fit_explanation_reading(before: list, after: list, group: str = MAIN_ABLATIONS) -> dict:
    """v4's reading: 'supported' if the agreement among `group`'s resolved rows is higher in `after` (v4) than in `before`
    (v3) and above one half; 'refuted' if it is no higher than in `before`; 'inconclusive' otherwise (or with nothing resolved)."""
    b, a = (next((r for r in rows if r["table"] == group), None) for rows in (before, after))
    if b is None or a is None: raise TBPSError(f"no agreement row {group!r} in both studies (have {bool(b)} and {bool(a)})")
    rate = lambda r: r["agree"] / r["resolved"] if r["resolved"] else None
    rb, ra = rate(b), rate(a)
    if ra is None or rb is None: reading = "inconclusive"
    elif ra <= rb: reading = "refuted"
    elif ra > 0.5: reading = "supported"
    else: reading = "inconclusive"
    return dict(group=group, reading=reading, before=f"{b['agree']} of {b['resolved']} resolved agree",
                after=f"{a['agree']} of {a['resolved']} resolved agree", before_rate=rb, after_rate=ra)

READINGS = {"fit_explanation": fit_explanation_reading}  # readings across two studies, by the name a report's parameters give
