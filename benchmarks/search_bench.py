"""Gallery-search benchmark: indexing throughput, query latency and peak memory, and CLI search vs the evaluator.

    python benchmarks/search_bench.py --checkpoint CKPT [--synthpedes ROOT] [--million 1000000] [--dims 128 512]
                                      [--out results/search/bench.json] [--faiss]

1. SynthPEDES (synthetic): index the test images (annotation order) with CKPT, search every test caption with the
   `tbps-clip search` command (top-1), and compare its top-1 accuracy with the evaluator's R@1 on the same split;
   single-query latency (text encoding + search) p50/p95.
2. A synthetic index of N random unit vectors per dimension: written as a real index, then searched in a fresh
   process (memory-mapped) to measure single-query latency p50/p95, a batch of 64 queries, and the peak resident
   memory against the size of the index files.
3. With --faiss (needs faiss-cpu): the same queries through faiss.IndexFlatIP (exact) for comparison.
Every figure is measured on the machine that runs it; the JSON records the machine.
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs, p):
    return float(np.percentile(np.asarray(xs) * 1000, p))


def memory_mb():
    "Peak and current resident memory, split into anonymous (heap) and file-backed (memory-mapped) pages (Linux)."
    f = {ln.split(":")[0]: int(ln.split()[1]) / 1024 for ln in open("/proc/self/status") if ln.startswith(("Vm", "Rss"))}
    return dict(peak_rss=f.get("VmHWM"), rss=f.get("VmRSS"), rss_anon=f.get("RssAnon"), rss_file=f.get("RssFile"))


def synthpedes_part(a):
    "Index SynthPEDES test images with the checkpoint, CLI search of every caption, evaluator R@1, latency."
    from tbps_clip.cli import main
    from tbps_clip.annotations import read_annotations
    from tbps_clip.run import evaluate_checkpoint
    from tbps_clip.search import Encoder, GalleryIndex, index_gallery
    from tbps_clip.synthpedes import ensure_synthpedes
    data = Path(a.synthpedes) if a.synthpedes else ensure_synthpedes()
    ann = read_annotations(data / "annotations.json")
    test = ann.split("test")
    work = Path(tempfile.mkdtemp(prefix="search-bench-"))
    (work / "gallery.txt").write_text("\n".join(str(ann.image_path(r)) for r in test))
    caps = [(c, r.pid) for r in test for c in r.captions]
    (work / "queries.txt").write_text("\n".join(c for c, _ in caps))
    ov = [f"data.dataset=annotations", f"data.annotations={data / 'annotations.json'}"]
    enc = Encoder.from_checkpoint(a.checkpoint, ov)
    out = {}
    for dtype in ("float32", "float16"):
        _, rep = index_gallery(enc, [Path(p) for p in (work / "gallery.txt").read_text().splitlines()], work / f"idx-{dtype}",
                               dtype=dtype, progress=False)
        buf = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            rc = main(["search", "--index", str(work / f"idx-{dtype}"), "--queries-file", str(work / "queries.txt"), "-k", "1", "--json"])
        cli_s = time.perf_counter() - t0
        assert rc == 0
        pid_of = {str(ann.image_path(r)): r.pid for r in test}
        top1 = [pid_of[json.loads(s)["hits"][0]["file"]] for s in buf.getvalue().splitlines()]
        out[dtype] = dict(indexed=rep.indexed, skipped=len(rep.skipped), index_seconds=round(rep.seconds, 2),
                          images_per_s=round(rep.images_per_s, 1), cli_search_seconds_all_queries=round(cli_s, 2),
                          cli_top1_accuracy=100 * float(np.mean([p == q for p, (_, q) in zip(top1, caps)])))
    idx = GalleryIndex.load(work / "idx-float32")
    lat = []
    for q, _ in caps[:a.latency_queries]:
        t0 = time.perf_counter(); idx.search(enc, q, k=10); lat.append(time.perf_counter() - t0)
    ev = evaluate_checkpoint(a.checkpoint, ov)["metrics"]
    return dict(dataset=f"SynthPEDES (synthetic) test at {data}", gallery=len(test), queries=len(caps),
                checkpoint=str(a.checkpoint), arch=enc.fingerprint["arch"], evaluator_r1=ev["R@1"], by_dtype=out,
                query_latency_ms=dict(p50=pct(lat, 50), p95=pct(lat, 95), n=len(lat), k=10,
                                      includes="text encoding + search, one query at a time"))


def make_synthetic_index(folder, n, dim, dtype, seed=0, chunk=200_000):
    "An index of `n` random unit vectors in `dim` dimensions (written part by part, as `index --add` would)."
    from tbps_clip.search import GalleryIndex
    fp = dict(arch="synthetic-random", image_size=[0, 0], context_length=0, embed_dim=dim, normalize="none", weights="random")
    idx = GalleryIndex(fp, {}, dtype, root="/synthetic")
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        idx.append(x, [f"img/{i:08d}.jpg" for i in range(s, s + len(x))])
        idx.save(folder)  # writes only the new part
    return folder


def million_child(folder, dim, n_queries, k):
    "Run in a fresh process: load memory-mapped, time searches, report peak RSS."
    import torch
    from tbps_clip.search import GalleryIndex
    base = memory_mb()
    t0 = time.perf_counter()
    idx = GalleryIndex.load(folder)
    load_s = time.perf_counter() - t0
    q = torch.nn.functional.normalize(torch.randn(n_queries + 64, dim, generator=torch.Generator().manual_seed(1)), dim=1)
    idx.search_embeddings(q[:1], k)  # warm the page cache and the kernels once
    lat = []
    for i in range(n_queries):
        t0 = time.perf_counter(); idx.search_embeddings(q[i:i + 1], k); lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); idx.search_embeddings(q[n_queries:], k); batch_s = time.perf_counter() - t0
    files = sum(f.stat().st_size for f in Path(folder).iterdir())
    emb = sum(f.stat().st_size for f in Path(folder).glob("embeddings-*.npy"))
    return dict(count=len(idx), dim=dim, dtype=idx.dtype, load_seconds=round(load_s, 2), k=k,
                latency_ms=dict(p50=pct(lat, 50), p95=pct(lat, 95), n=n_queries, includes="search only (query features given)"),
                batch64_ms_per_query=1000 * batch_s / 64, index_files_mb=files / 2**20, embeddings_mb=emb / 2**20,
                memory_after_imports_mb=base, memory_mb=memory_mb(), torch_threads=torch.get_num_threads())


def faiss_child(folder, dim, n_queries, k):
    "Exact inner-product search with faiss over the same embeddings (loaded fully into memory, as faiss needs)."
    import faiss
    import torch
    from tbps_clip.search import GalleryIndex
    idx = GalleryIndex.load(folder)
    t0 = time.perf_counter()
    fi = faiss.IndexFlatIP(dim)
    for p in idx.parts: fi.add(np.ascontiguousarray(p, dtype=np.float32))
    build_s = time.perf_counter() - t0
    q = torch.nn.functional.normalize(torch.randn(n_queries + 64, dim, generator=torch.Generator().manual_seed(1)), dim=1).numpy()
    fi.search(q[:1], k)
    lat = []
    for i in range(n_queries):
        t0 = time.perf_counter(); fi.search(q[i:i + 1], k); lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); _, I = fi.search(q[n_queries:], k); batch_s = time.perf_counter() - t0
    ours = idx.search_embeddings(torch.from_numpy(q[n_queries:]), k)
    same = float(np.mean([[h.index for h in hs] == list(r) for hs, r in zip(ours, I)]))
    res = dict(engine="faiss.IndexFlatIP", build_seconds=round(build_s, 2), latency_ms=dict(p50=pct(lat, 50), p95=pct(lat, 95), n=n_queries),
               batch64_ms_per_query=1000 * batch_s / 64, memory_mb=memory_mb(), same_top_k_as_ours=same)
    # an approximate index: inverted lists over k-means cells, trained on a sample, probing a few cells per query
    t0 = time.perf_counter()
    x = np.concatenate([np.asarray(p, dtype=np.float32) for p in idx.parts])
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, 1024, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x[np.random.default_rng(0).choice(len(x), 65536, replace=False)])
    ivf.add(x)
    ivf_build = time.perf_counter() - t0
    del x
    for nprobe in (8, 32):
        ivf.nprobe = nprobe
        lat = []
        for i in range(n_queries):
            t0 = time.perf_counter(); ivf.search(q[i:i + 1], k); lat.append(time.perf_counter() - t0)
        _, J = ivf.search(q[n_queries:], k)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(I, J)]))
        res[f"ivf1024_nprobe{nprobe}"] = dict(build_seconds=round(ivf_build, 1), latency_ms=dict(p50=pct(lat, 50), p95=pct(lat, 95)),
                                              recall_at_k_vs_exact=recall)
    res["memory_mb_after_ivf"] = memory_mb()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint for the SynthPEDES part (skipped without it)")
    ap.add_argument("--synthpedes", help="SynthPEDES folder (default: the embedded default, generated if missing)")
    ap.add_argument("--million", type=int, default=1_000_000, help="size of the synthetic index (0: skip)")
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--faiss", action="store_true", help="also time faiss.IndexFlatIP on the synthetic index")
    ap.add_argument("--work", help="folder for the synthetic indexes (default: a temporary folder)")
    ap.add_argument("--out", help="write the results here (JSON)")
    ap.add_argument("--child", nargs=4, metavar=("KIND", "FOLDER", "DIM", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, folder, dim, n = a.child
        fn = million_child if kind == "ours" else faiss_child
        print(json.dumps(fn(folder, int(dim), int(n), 10)))
        return
    from tbps_clip.core import environment_info
    res = dict(machine=environment_info(), load_average=os.getloadavg(), when=time.strftime("%Y-%m-%dT%H:%M:%S"))
    if a.checkpoint:
        res["synthpedes"] = synthpedes_part(a)
        print(json.dumps(res["synthpedes"], indent=1), flush=True)
    if a.million:
        work = Path(a.work or tempfile.mkdtemp(prefix="search-bench-million-"))
        res["synthetic_index"] = []
        for dim in a.dims:
            folder = work / f"random-{a.million}-{dim}-{a.dtype}"
            t0 = time.perf_counter()
            if not (folder / "index.json").exists(): make_synthetic_index(folder, a.million, dim, a.dtype)
            row = dict(write_seconds=round(time.perf_counter() - t0, 1))
            for kind in ["ours"] + (["faiss"] if a.faiss else []):
                r = subprocess.run([sys.executable, __file__, "--child", kind, str(folder), str(dim), str(a.latency_queries)],
                                   capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
                if r.returncode != 0: raise SystemExit(f"{kind} child failed:\n{r.stderr[-3000:]}")
                row[kind] = json.loads(r.stdout.strip().splitlines()[-1])
            res["synthetic_index"].append(row)
            print(json.dumps(row, indent=1), flush=True)
    if a.out:
        from tbps_clip.core import atomic_write_json  # a killed run leaves the old record whole
        atomic_write_json(a.out, res)  # makes its folder
        print(f"results written to {a.out}")


if __name__ == "__main__":
    main()
