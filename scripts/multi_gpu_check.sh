#!/usr/bin/env bash
# Several GPUs against one: train configs/small/mor-expert-3.yaml for a few steps with one process, then with
# DDP and FSDP2 on NPROC GPUs at the same global batch, resume a DDP run from a mid-way checkpoint, and print
# each run's loss curve, tokens/s and peak memory. Usage: scripts/multi_gpu_check.sh [NPROC] [OUT_DIR]
# (needs the shared corpus prepared into runs/data/corpus, see scripts/small_experiments.sh). COMPILE=false skips
# torch.compile (each run then starts in seconds).
set -euo pipefail
nproc=${1:-2}
out=${2:-runs/multi-gpu}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
common=(configs/small/mor-expert-3.yaml --set budget.flops=null --set budget.steps=40 --set run.progress=false
        --set run.save_every=20 --set run.eval_every=20 --set run.eval_batches=4 --set run.log_every=5
        --set batch.grad_accum=null --set batch.global_batch_size=64 --set run.compile="${COMPILE:-true}")

python3 -m mor.cli train "${common[@]}" --set run.out_dir="$out/single"
for strategy in ddp fsdp; do
  torchrun --standalone --nproc_per_node="$nproc" -m mor.cli train "${common[@]}" --set run.strategy=$strategy \
    --set run.out_dir="$out/$strategy"
done
mkdir -p "$out/resumed/checkpoints"
cp -r "$out/ddp/checkpoints/step_00000020" "$out/resumed/checkpoints/"
torchrun --standalone --nproc_per_node="$nproc" -m mor.cli train "${common[@]}" --set run.strategy=ddp \
  --set run.out_dir="$out/resumed" --resume "$out/resumed/checkpoints/step_00000020"

python3 - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
for name in ("single", "ddp", "fsdp", "resumed"):
    rows = [json.loads(line) for line in open(f"{out}/{name}/metrics.jsonl")]
    losses = [(r["step"], round(r["loss"], 4)) for r in rows if "loss" in r]
    speed = statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)
    memory = max(r.get("peak_memory_gib", 0) for r in rows)
    print(f"{name:8} tokens/s {speed:>10,.0f}  peak GiB {memory:5.1f}  loss {losses}")
PY
