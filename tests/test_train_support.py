"""Shared helpers for the training tests: a tiny prepared corpus and tiny configs (no tests here)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from mor.data import prepare, train_tokenizer
from mor.train import TrainConfig, config_from_dict

VOCAB = 300
WORDS = ("the river runs past an old mill while seven quick foxes jump over lazy dogs and a king counts "
         "his gold in the tower as rain falls on green hills near the quiet sea").split()


def make_dataset(root: Path) -> Path:
    """A few hundred random documents, a 300-token BPE and token shards with a validation split."""
    rng = random.Random(0)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as handle:
        for _ in range(400):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
            handle.write(json.dumps({"text": text}) + "\n")
    tokenizer = train_tokenizer([corpus], VOCAB, root / "tokenizer.json", progress=False)
    prepare([corpus], tokenizer, root / "data", val_fraction=0.1, progress=False)
    return root / "data"


def tiny_config(data_path: Path, out_dir: Path, **sections: dict[str, Any]) -> TrainConfig:
    """A tiny expert-choice MoR run of a few steps on CPU; ``sections`` update the defaults per section."""
    config: dict[str, Any] = {
        "model": {"preset": "tiny", "vocab_size": VOCAB, "sharing": "middle_cycle", "num_recursions": 2,
                  "router": "expert"},
        "data": {"path": str(data_path), "seq_len": 32},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "wsd", "warmup": 2},
        "budget": {"steps": 6},
        "batch": {"micro_batch_size": 4},
        "run": {"out_dir": str(out_dir), "log_every": 1, "eval_every": 0, "eval_batches": 2, "save_every": 0,
                "progress": False, "device": "cpu"},  # fp32 on CPU: the exact-equality tests hold on any machine
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config_from_dict(config)
