#!/usr/bin/env bash
# The GPU benchmarks in one script, for a machine with one CUDA GPU and no network (never CI). Run from the repository
# root with the open_clip, ftfy and wcwidth wheels in .whl/ and the small pretrained CLIP in .cache/synthclip/.
# Each step has its own time limit and writes into $OUT as it goes, so a cut-off run still returns what finished:
#   1. SynthPEDES (synthetic) generated on the device;
#   2. benchmarks/train_step.py on CUDA: the three presets on tbps-tiny and ViT-B/16 at 224x224 and 384x128
#      (bf16 autocast, fused AdamW, SDPA inside open_clip, pinned-memory loaders with workers), then the clip
#      preset on ViT-B/16 224 under fp16 and under torch.compile;
#   3. benchmarks/gpu_realscale.py: the library's own training loop, ViT-B/16 random weights, 224x224;
#   4. torchrun with the NCCL backend (one process: the NCCL init, all-gather and global-gradient paths);
#   5. benchmarks/learnability_probe.py learning curves (synthetic; why the small CLIP learns slowly).
set -u
O=${OUT:-/tmp/gpu_suite}; mkdir -p "$O"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD TBPS_CLIP_CACHE=$PWD/.cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__)"; } > "$O/env.txt" 2>&1
log() { echo "== $(date +%T) $*" | tee -a "$O/steps.txt"; }
log synth; timeout 120 python3 -m tbps_clip.cli synth > "$O/synth.txt" 2>&1; log "synth rc=$?"
log train_step; timeout 170 python3 benchmarks/train_step.py --device cuda --precision bf16 --before '' --workers 8 \
  --cases tiny vitb224 vitb384 --presets clip simplified tbps --name gpu_train_step > "$O/train_step.txt" 2>&1
log "train_step rc=$?"; cp benchmarks/results/gpu_train_step.json "$O/" 2>/dev/null
log fp16; timeout 60 python3 benchmarks/train_step.py --device cuda --precision fp16 --before '' --cases vitb224 \
  --presets clip --loader-presets --exposed-cases --name gpu_fp16 >> "$O/train_step.txt" 2>&1; log "fp16 rc=$?"
log compile; timeout 100 python3 benchmarks/train_step.py --device cuda --precision bf16 --before '' --cases vitb224 \
  --presets clip --loader-presets --exposed-cases --set train.compile=default --name gpu_compile >> "$O/train_step.txt" 2>&1
log "compile rc=$?"
R="$O/realscale.jsonl"
log realscale; timeout 90 python3 benchmarks/gpu_realscale.py --preset clip --steps 300 --out "$R" > "$O/realscale.txt" 2>&1
log "realscale clip rc=$?"
timeout 80 python3 benchmarks/gpu_realscale.py --preset tbps --steps 150 --out "$R" >> "$O/realscale.txt" 2>&1
log "realscale tbps rc=$?"
log nccl; timeout 60 torchrun --standalone --nproc_per_node 1 -m tbps_clip.cli train --preset clip_star --out /tmp/nccl \
  model.pretrained=none train.max_steps=40 train.device=cuda train.dist_backend=nccl data.num_workers=4 > "$O/nccl.txt" 2>&1
log "nccl rc=$?"
log probe; export DEV=cuda OUTFILE="$O/probe.jsonl" DATA=$TBPS_CLIP_CACHE/synthpedes/v2-default PROBE_CACHE=/tmp/probe
P=.cache/synthclip/tbps-tiny-v2.pt
timeout 170 python3 benchmarks/learnability_probe.py \
  "{\"name\":\"ft_pretrained_2000\",\"init\":\"$P\",\"lr\":3e-4,\"steps\":2000,\"eval_every\":250}" \
  '{"name":"vit_random_4000","steps":4000,"eval_every":500}' \
  '{"name":"cnn_random_2000","image":"cnn","steps":2000,"eval_every":250}' \
  '{"name":"vit_pos8_2000","pos_scale":8,"steps":2000,"eval_every":250}' \
  '{"name":"vit_lr5e-4_2000","lr":5e-4,"steps":2000,"eval_every":250}' \
  '{"name":"vit_bs256_1000","bs":256,"steps":1000,"eval_every":250}' > "$O/probe.txt" 2>&1
log "probe rc=$?"
