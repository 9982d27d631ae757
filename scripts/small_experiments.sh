#!/usr/bin/env bash
# The isoFLOP comparison of configs/small/ on one GPU: prepare the shared corpus once, train each config at the
# same forward-FLOP budget, keep each run's metrics. Usage:
#   scripts/small_experiments.sh DATA_DIR OUT_DIR [CONFIG_NAME ...]   (default: vanilla recursive-3 mor-expert-3)
# DATA_DIR holds corpus/*.jsonl.xz and tokenizers/smollm2/ (the shared data folder).
set -euo pipefail
data=${1:?shared data folder}
out=${2:?output folder}
shift 2
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(vanilla recursive-3 mor-expert-3)

mor data prepare "$data"/corpus/prose-train-000.jsonl.xz "$data"/corpus/reference-train-00*.jsonl.xz \
  --val "$data"/corpus/prose-val.jsonl.xz --val "$data"/corpus/reference-val.jsonl.xz \
  --tokenizer "$data"/tokenizers/smollm2 --out runs/data/corpus --workers 8

mkdir -p "$out"
for name in "${names[@]}"; do
  start=$(date +%s)
  mor train "configs/small/$name.yaml" --set run.progress=false 2>&1 | tail -n 5
  echo "$name: $(( $(date +%s) - start )) s wall"
  mkdir -p "$out/$name"
  cp "runs/small/$name/metrics.jsonl" "runs/small/$name/config.yaml" "$out/$name/"
done
