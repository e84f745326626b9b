#!/usr/bin/env bash
# The study on one GPU: many training runs at once, each its own process, all sharing the device.
# Prepared and tested on the CPU (tests/test_study.py::test_gpu_study_script_runs_concurrent_jobs, N = 2 at smoke scale).
#
#   experiments/gpu_study.sh [PARAMS.yaml] [OUT]
#     PARAMS  a sweep parameter file (default experiments/params/synthpedes-study.yaml)
#     OUT     results folder (default results/study/synthpedes-v3-gpu: its own folder, never mixed with CPU records)
#   environment:
#     JOBS       runs at once on the device (default 8); CPU threads are divided between them
#     DEVICE     cuda or cpu (default cuda when torch sees one)
#     SCALE      replaces the file's scale (e.g. smoke, to try the script)
#     PRECISION  train.precision for every run (default: the configuration's; fp32 to compare with the CPU records)
#     ONLY       notebooks to run (space-separated, as --only)
#     PY         the Python to use (default python)
#
# The device's memory is shared by the JOBS processes: each allocates what its run needs (expandable segments keep the
# caching allocator from holding fragments); lower JOBS if a run stops with out-of-memory. Resumable like any sweep:
# run it again and recorded runs are skipped. The hardware is written to OUT/HARDWARE.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
params=${1:-experiments/params/synthpedes-study.yaml}
out=${2:-results/study/synthpedes-v3-gpu}
py=${PY:-python}
jobs=${JOBS:-8}
device=${DEVICE:-$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the parameter file for this device: every run on `device` (train.device does not change a run's result fingerprint)
"$py" - "$params" "$tmp/sweep.yaml" "$device" "${SCALE:-}" "${PRECISION:-}" <<'EOF'
import sys
from pathlib import Path
import yaml
from tbps_clip.study.driver import load_sweep
src, dst, device, scale, precision = sys.argv[1:6]
spec, checked = yaml.safe_load(Path(src).read_text()), load_sweep(src)
extra = {"train.device": device, **({"train.precision": precision} if precision else {})}
spec["notebooks_dir"] = str(Path(checked["notebooks_dir"]).resolve())
spec["params"] = {**(spec.get("params") or {}), **({"scale": scale} if scale else {})}
spec["params"]["overrides"] = {**spec["params"].get("overrides", {}), **extra}
for i, nb in enumerate(spec["notebooks"]):  # a notebook's own overrides replace the shared ones: the device goes there too
    if isinstance(nb, dict) and "overrides" in (nb.get("params") or {}):
        nb["params"]["overrides"] = {**nb["params"]["overrides"], **extra}
Path(dst).write_text(yaml.safe_dump(spec, sort_keys=False))
EOF

mkdir -p "$out"
{
  echo "device: $device; jobs at once: $jobs; parameter file: $params; scale: ${SCALE:-as in the file}; started $(date -u +%FT%TZ)"
  if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true; fi
  echo "CPU: $(nproc) cores; $("$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"
} > "$out/HARDWARE.txt"

start=$SECONDS
# shellcheck disable=SC2086
"$py" -m tbps_clip.cli study run "$tmp/sweep.yaml" --out "$out" --jobs "$jobs" ${ONLY:+--only $ONLY}
echo "finished in $((SECONDS - start)) s" | tee -a "$out/HARDWARE.txt"
