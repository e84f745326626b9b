"""The vectorised, chunked metrics against a plain reference written for clarity."""
import pytest
import torch

from tbps_clip.metrics import rank_metrics


def reference_metrics(sims, qp, gp, ks=(1, 5, 10)):
    "Plain loops: sort each row (ties by gallery index), then the textbook definitions."
    rows = {f"R@{k}": [] for k in ks}
    rows.update(mAP=[], mINP=[])
    for i in range(sims.shape[0]):
        order = sorted(range(sims.shape[1]), key=lambda j: (-float(sims[i, j]), j))
        hits = [int(gp[j] == qp[i]) for j in order]
        rel_positions = [pos + 1 for pos, h in enumerate(hits) if h]
        for k in ks:
            rows[f"R@{k}"].append(float(any(hits[:k])))
        rows["mAP"].append(sum((n + 1) / p for n, p in enumerate(rel_positions)) / len(rel_positions))
        rows["mINP"].append(len(rel_positions) / rel_positions[-1])
    return {k: 100 * sum(v) / len(v) for k, v in rows.items()}


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_random(seed):
    g = torch.Generator().manual_seed(seed)
    n_ids, q, gal = 15, 60, 45
    qp = torch.randint(0, n_ids, (q,), generator=g)
    gp = torch.cat([torch.arange(n_ids), torch.randint(0, n_ids, (gal - n_ids,), generator=g)])  # every pid present
    qf = torch.nn.functional.normalize(torch.randn(q, 8, generator=g), dim=-1)
    gf = torch.nn.functional.normalize(torch.randn(gal, 8, generator=g), dim=-1)
    got = rank_metrics(qf, gf, qp, gp, chunk_size=7)
    ref = reference_metrics(qf @ gf.t(), qp, gp)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_ties_and_many_relevant():
    # quantised features create many exact ties; several relevant images per query
    g = torch.Generator().manual_seed(1)
    qf = torch.randint(-1, 2, (30, 4), generator=g).float()
    gf = torch.randint(-1, 2, (40, 4), generator=g).float()
    qp, gp = torch.randint(0, 4, (30,), generator=g), torch.arange(40) % 4
    got = rank_metrics(qf, gf, qp, gp, chunk_size=8)
    ref = reference_metrics(qf @ gf.t(), qp, gp)
    assert got["R@1"] == pytest.approx(ref["R@1"]) and got["mAP"] == pytest.approx(ref["mAP"])
    assert got["mINP"] == pytest.approx(ref["mINP"])


def test_chunk_size_does_not_change_results():
    g = torch.Generator().manual_seed(2)
    qf, gf = torch.randn(50, 6, generator=g), torch.randn(20, 6, generator=g)
    qp, gp = torch.randint(0, 10, (50,), generator=g), torch.arange(20) % 10
    a, b = rank_metrics(qf, gf, qp, gp, chunk_size=1), rank_metrics(qf, gf, qp, gp, chunk_size=1000)
    assert a == b


def test_perfect_and_worst_ranking():
    f = torch.eye(4)
    assert rank_metrics(f, f, torch.arange(4), torch.arange(4)) == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0,
                                                                    "mAP": 100.0, "mINP": 100.0}
    # each query's only match is ranked last of 4
    worst = rank_metrics(-f, f, torch.arange(4), torch.arange(4))
    assert worst["R@1"] == 0 and worst["mAP"] == pytest.approx(25.0) and worst["mINP"] == pytest.approx(25.0)


def test_query_without_relevant_image_is_an_error():
    with pytest.raises(ValueError, match="no relevant image"):
        rank_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 5]), torch.tensor([0, 1]))


def test_memory_bound_does_not_change_results():
    "A tiny memory budget ranks one query at a time; the metrics are the same (pids unsorted, not contiguous)."
    g = torch.Generator().manual_seed(3)
    qf, gf = torch.randn(40, 6, generator=g), torch.randn(30, 6, generator=g)
    gp = (torch.randperm(30, generator=g) % 9) * 11 + 5
    qp = gp[torch.randint(0, 30, (40,), generator=g)]
    a = rank_metrics(qf, gf, qp, gp, max_chunk_mb=1e-6)
    ref = reference_metrics(qf @ gf.t(), qp, gp)
    assert a == rank_metrics(qf, gf, qp, gp) and all(a[k] == pytest.approx(v, abs=1e-9) for k, v in ref.items())
