"""How well could a perfect attribute reader do on SynthPEDES? (synthetic; the ceiling of the retrieval task)

For each test (or val) caption, the generator's attributes.json says which attributes it mentions. An oracle ranks
first every gallery image that the caption does not contradict, ties in random order, so its expected R@1 is the
fraction of those images that show the caption's identity. Two oracles: identity level (an image is consistent when
its identity has the mentioned values) and image level (an image is ruled out only by an attribute visible in its
viewpoint that contradicts the caption). Usage:
    python benchmarks/synthpedes_oracle.py [DATASET_FOLDER ...]   (default: the cache's default SynthPEDES)
Prints one line per split and writes benchmarks/results/synthpedes_oracle.txt."""
import json
import sys
from pathlib import Path

import numpy as np

from tbps_clip.core import cache_dir
from tbps_clip.synthpedes.identities import visible_attributes


def oracle_r1(root: Path, split: str) -> dict:
    "Expected R@1 (%) of the two oracles on `split`, with the number of identities consistent with a caption."
    meta = json.loads((root / "attributes.json").read_text())
    ids = {int(k): v for k, v in meta["identities"].items()}
    gal = [(int(Path(rel).name.split("_")[0]), info) for rel, info in meta["images"].items() if rel.startswith(split + "/")]
    if not gal: return {}
    pids = np.array([p for p, _ in gal])
    vis = [visible_attributes(ids[p], info["view"]) for p, info in gal]
    r1_id, r1_img, n_ids = [], [], []
    for p, info in gal:
        a = ids[p]
        for keys in info["mentions"]:
            cons_id = np.array([all(ids[q][k] == a[k] for k in keys) for q in pids])
            cons_img = np.array([all(k not in v or v[k] == a[k] for k in keys) for v in vis])
            r1_id.append((cons_id & (pids == p)).sum() / cons_id.sum())
            r1_img.append((cons_img & (pids == p)).sum() / cons_img.sum())
            n_ids.append(len(set(pids[cons_id])))
    return dict(split=split, queries=len(r1_id), gallery=len(gal), identities=len(set(pids)),
                identity_level_R1=round(100 * float(np.mean(r1_id)), 2), image_level_R1=round(100 * float(np.mean(r1_img)), 2),
                consistent_identities_mean=round(float(np.mean(n_ids)), 2))


if __name__ == "__main__":
    roots = [Path(a) for a in sys.argv[1:]] or [cache_dir() / "synthpedes" / "v2-default"]
    lines = []
    for root in roots:
        for split in ("val", "test"):
            r = oracle_r1(root, split)
            if r: lines.append(f"{root.name} " + json.dumps(r))
    print("\n".join(lines))
    out = Path(__file__).resolve().parent / "results" / "synthpedes_oracle.txt"
    out.write_text("SynthPEDES attribute-oracle R@1 (synthetic; expected R@1 with random tie order)\n" + "\n".join(lines) + "\n")
