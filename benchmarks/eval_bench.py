"""Evaluation benchmark: encode + rank + metrics at CUHK-PEDES size, and ranking at 100,000 x 1,000,000 in chunks.

    python benchmarks/eval_bench.py [--threads 1] [--large-queries 1000] [--large-ref-queries 32] [--no-encode]
                                    [--skip-large] [--name eval_bench]

1. CUHK-PEDES-sized test (6,156 queries x 3,074 images, 1,000 identities, 512-d random features clustered by
   identity so the metrics are not trivially ~0): `metrics.rank_metrics` (the library's ranking) next to a
   straightforward implementation (the whole similarity matrix, a full stable argsort of every row, metrics
   from the sorted hit matrix) in the same process. Prints wall time and the peak memory each adds, and checks
   that both give the same metrics. With encoding on, also times `evaluate.encode_texts`/`encode_images` of a
   randomly initialised tbps-tiny on random captions and images of the same counts (common to both rankers).
2. 100,000 queries x 1,000,000 gallery images (512-d, ~2 images per identity): the gallery is built in full;
   the library's ranking runs on the first --large-queries queries (its query chunk is bounded by
   `max_chunk_mb`), the argsort reference on the first --large-ref-queries in chunks of 16 rows (a whole
   100,000 x 1,000,000 matrix would need 400 GB); both times are extrapolated linearly to 100,000 queries,
   which the output says. Metrics of the two are compared on the reference's queries.
Results: benchmarks/results/<name>.json and .txt, with the machine, torch threads and load average.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import PeakMemory, fmt_table, load_average, machine, write_results  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def argsort_metrics(qf, gf, qp, gp, ks=(1, 5, 10), chunk: int = 0) -> dict:
    "The straightforward reference: full similarity rows, a full stable argsort per row, metrics from sorted hits."
    rows = {f"R@{k}": [] for k in ks}
    rows.update(mAP=[], mINP=[])
    step = chunk or qf.shape[0]
    pos = torch.arange(1, gf.shape[0] + 1, dtype=torch.float64)
    for s in range(0, qf.shape[0], step):
        sims = (qf[s:s + step] @ gf.t()).float()
        order = torch.argsort(sims, dim=1, descending=True, stable=True)  # ties: lower gallery index first
        hits = gp[order] == qp[s:s + step, None]
        n_rel = hits.sum(1).double()
        for k in ks: rows[f"R@{k}"].append(hits[:, :k].any(1).double())
        hf = hits.double()
        rows["mAP"].append((hf.cumsum(1) / pos * hf).sum(1) / n_rel)
        rows["mINP"].append(n_rel / (hf * pos).max(1).values)
    return {k: 100 * torch.cat(v).mean().item() for k, v in rows.items()}


def cuhk_like(seed: int = 0, n_ids: int = 1000, n_images: int = 3074, n_queries: int = 6156, dim: int = 512,
              noise: float = 3.0):
    "Random features with CUHK-PEDES's test structure: every id has >= 1 image, captions ~2 per image."
    g = torch.Generator().manual_seed(seed)
    gp = torch.cat([torch.arange(n_ids), torch.randint(0, n_ids, (n_images - n_ids,), generator=g)])
    gp = gp[torch.randperm(n_images, generator=g)]
    img_of_query = torch.cat([torch.arange(n_images).repeat_interleave(n_queries // n_images),
                              torch.randint(0, n_images, (n_queries % n_images,), generator=g)])
    qp = gp[img_of_query]
    centre = torch.randn(n_ids, dim, generator=g)
    gf = F.normalize(centre[gp] + noise * torch.randn(n_images, dim, generator=g), dim=-1)
    qf = F.normalize(centre[qp] + noise * torch.randn(n_queries, dim, generator=g), dim=-1)
    return qf, gf, qp, gp


def timed(fn, device="cpu", repeat: int = 1):
    "(result, best seconds of `repeat` runs, peak extra MiB of the first) of fn(); best-of-n damps a shared machine's noise."
    times = []
    for i in range(repeat):
        with PeakMemory(device) as pm:
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        if i == 0: extra = pm.extra
    return out, min(times), extra


class RandomImages(torch.utils.data.Dataset):
    "Seeded random image tensors (stand-ins for decoded, transformed test images)."
    def __init__(self, n, size): self.n, self.size = n, size
    def __len__(self): return self.n
    def __getitem__(self, i): return torch.randn(3, *self.size, generator=torch.Generator().manual_seed(i))


def encode_part(n_queries, n_images, arch, batch):
    "Seconds to encode n_queries random captions and n_images random images with a random `arch` model."
    import random
    from tbps_clip.evaluate import encode_images, encode_texts
    from tbps_clip.model import create_model
    torch.manual_seed(0)
    model = create_model(arch).eval()
    rng = random.Random(0)
    words = "a man woman wearing black white red blue shirt jacket pants shoes bag carrying long short hair".split()
    caps = [" ".join(rng.choice(words) for _ in range(rng.randint(15, 40))) for _ in range(n_queries)]
    t0 = time.perf_counter()
    q = encode_texts(model, caps, batch, torch.device("cpu"))
    t1 = time.perf_counter()
    g = encode_images(model, RandomImages(n_images, model.image_size), batch, torch.device("cpu"))
    t2 = time.perf_counter()
    return dict(arch=arch, image_size=list(model.image_size), text_s=round(t1 - t0, 2), image_s=round(t2 - t1, 2),
                shapes=[list(q.shape), list(g.shape)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="CUHK-size timings: best of this many runs")
    ap.add_argument("--large-queries", type=int, default=1000, help="queries of the large case actually ranked")
    ap.add_argument("--large-ref-queries", type=int, default=32, help="queries of the large case ranked by argsort")
    ap.add_argument("--large-total", type=int, default=100_000)
    ap.add_argument("--large-gallery", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--max-chunk-mb", type=float, default=256)
    ap.add_argument("--encode-arch", default="tbps-tiny")
    ap.add_argument("--no-encode", action="store_true")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--before", default="main", help="git ref whose rank_metrics is also timed ('' = skip)")
    ap.add_argument("--name", default="eval_bench")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from tbps_clip.metrics import rank_metrics
    rec = dict(machine=machine(), args=vars(a))
    lines = [f"machine: {rec['machine']['cpu']}, {rec['machine']['cpus']} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s); load average at start {load_average()}"]

    # ---- 1. CUHK-PEDES size ----
    qf, gf, qp, gp = cuhk_like(dim=a.dim)
    rank_metrics(qf[:64], gf, qp[:64], gp)  # warm-up (allocator, kernels)
    r = a.repeat
    ours, t_ours, m_ours = timed(lambda: rank_metrics(qf, gf, qp, gp, max_chunk_mb=a.max_chunk_mb), repeat=r)
    ref, t_ref, m_ref = timed(lambda: argsort_metrics(qf, gf, qp, gp), repeat=r)
    _, t_mm, _ = timed(lambda: qf @ gf.t(), repeat=r)
    before = None
    if a.before:  # the library's ranking as of --before, same process and load
        from bench_common import load_before
        old = load_before(a.before, "metrics").rank_metrics
        old(qf[:64], gf, qp[:64], gp)
        before = timed(lambda: old(qf, gf, qp, gp), repeat=r)
    same = all(abs(ours[k] - ref[k]) < 1e-9 for k in ref)
    cuhk = dict(queries=len(qf), gallery=len(gf), ids=int(gp.unique().numel()), ours=ours, argsort=ref,
                ours_s=round(t_ours, 3), argsort_s=round(t_ref, 3), matmul_s=round(t_mm, 3),
                ours_peak_extra_mib=round(m_ours, 1), argsort_peak_extra_mib=round(m_ref, 1), same_metrics=same,
                speedup=round(t_ref / t_ours, 2),
                speedup_excluding_matmul=round((t_ref - t_mm) / max(t_ours - t_mm, 1e-9), 2),
                load_average=load_average())
    if before:
        cuhk.update(before_ref=a.before, before=before[0], before_s=round(before[1], 3),
                    before_peak_extra_mib=round(before[2], 1), before_same=all(abs(before[0][k] - ref[k]) < 1e-9 for k in ref))
    if not a.no_encode:
        cuhk["encode"] = encode_part(len(qf), len(gf), a.encode_arch, 256)
    rec["cuhk"] = cuhk
    rows = [["rank_metrics (library)", f"{t_ours:.3f}", f"{m_ours:.0f}", f"{ours['R@1']:.3f}", f"{ours['mAP']:.3f}"],
            ["full argsort (reference)", f"{t_ref:.3f}", f"{m_ref:.0f}", f"{ref['R@1']:.3f}", f"{ref['mAP']:.3f}"],
            ["  (the similarity matmul alone)", f"{t_mm:.3f}", "", "", ""]]
    if before:
        rows.insert(1, [f"rank_metrics before ({a.before})", f"{before[1]:.3f}", f"{before[2]:.0f}",
                        f"{before[0]['R@1']:.3f}", f"{before[0]['mAP']:.3f}"])
    lines += ["", f"1. CUHK-PEDES size (best of {r} runs each): {len(qf)} queries x {len(gf)} images, {cuhk['ids']} ids, {a.dim}-d random "
              f"features (synthetic); load average {cuhk['load_average']}",
              fmt_table(["ranking + metrics", "wall s", "peak extra MiB", "R@1", "mAP"], rows),
              f"speed-up {cuhk['speedup']}x (rank+metrics beyond the shared matmul: "
              f"{cuhk['speedup_excluding_matmul']}x); identical metrics: {same}"]
    if "encode" in cuhk:
        e = cuhk["encode"]
        lines.append(f"encoding ({e['arch']} at {e['image_size'][0]}x{e['image_size'][1]}, random weights and inputs): "
                     f"{len(qf)} captions {e['text_s']} s, {len(gf)} images {e['image_s']} s")
    print("\n".join(lines), flush=True)

    # ---- 2. 100,000 x 1,000,000 ----
    if not a.skip_large:
        G, nq, nr = a.large_gallery, min(a.large_queries, a.large_total), min(a.large_ref_queries, a.large_queries)
        g = torch.Generator().manual_seed(1)
        gp = torch.randperm(G, generator=g) // 2  # ~2 images per identity
        t = time.perf_counter()
        gf = torch.empty(G, a.dim)
        for s in range(0, G, 100_000):  # in blocks: no second full-size temporary
            gf[s:s + 100_000] = F.normalize(torch.randn(min(100_000, G - s), a.dim, generator=g), dim=-1)
        qp = gp[torch.randint(0, G, (nq,), generator=g)]
        qf = F.normalize(torch.randn(nq, a.dim, generator=g), dim=-1)
        build_s = time.perf_counter() - t
        gallery_mib = gf.numel() * 4 / 2**20
        ours, t_ours, m_ours = timed(lambda: rank_metrics(qf, gf, qp, gp, max_chunk_mb=a.max_chunk_mb))
        ours_sub = rank_metrics(qf[:nr], gf, qp[:nr], gp, max_chunk_mb=a.max_chunk_mb)
        ref, t_ref, m_ref = timed(lambda: argsort_metrics(qf[:nr], gf, qp[:nr], gp, chunk=16))
        same = all(abs(ours_sub[k] - ref[k]) < 1e-9 for k in ref)
        scale_o, scale_r = a.large_total / nq, a.large_total / nr
        large = dict(queries_total=a.large_total, gallery=G, queries_ranked=nq, ref_queries_ranked=nr,
                     gallery_mib=round(gallery_mib), build_s=round(build_s, 1), ours_s=round(t_ours, 2),
                     ours_extrapolated_s=round(t_ours * scale_o), ours_peak_extra_mib=round(m_ours, 1),
                     argsort_s=round(t_ref, 2), argsort_extrapolated_s=round(t_ref * scale_r),
                     argsort_peak_extra_mib=round(m_ref, 1), same_metrics_on_ref_queries=same,
                     speedup=round((t_ref / nr) / (t_ours / nq), 2), ours_metrics=ours, load_average=load_average())
        rec["large"] = large
        rows = [["rank_metrics (library)", nq, f"{t_ours:.1f}", f"{t_ours * scale_o:.0f}", f"{m_ours:.0f}"],
                ["argsort, 16-row chunks", nr, f"{t_ref:.1f}", f"{t_ref * scale_r:.0f}", f"{m_ref:.0f}"]]
        lines += ["", f"2. {a.large_total:,} queries x {G:,} images, {a.dim}-d random features (synthetic); gallery "
                  f"{gallery_mib:.0f} MiB resident; load average {large['load_average']}",
                  fmt_table(["ranking + metrics", "queries run", "wall s", f"extrapolated s ({a.large_total:,} q)",
                             "peak extra MiB"], rows),
                  f"times for {a.large_total:,} queries are EXTRAPOLATED linearly from the queries run; per-query "
                  f"speed-up {large['speedup']}x; identical metrics on the reference's {nr} queries: {same}"]
        print("\n".join(lines[-4:]), flush=True)
    rec["machine"]["load_average_end"] = load_average()
    print(f"\nwrote {write_results(a.name, rec, chr(10).join(lines))}")


if __name__ == "__main__":
    main()
