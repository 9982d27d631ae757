"""What a prefill costs when prompt shapes do not repeat, with and without cuDNN's attention.

    python benchmarks/prefill_shapes.py

Serves one-token requests through an eager engine (the 360M vanilla shape, bf16) whose prompts are all prefilled:
prompts of lengths never seen before, the same lengths again, and ragged pairs (a padding mask). Each figure is
the wall time of one ``Engine.generate`` call: the prefill and one decoding step. cuDNN builds an execution plan
for every new attention shape; the runner's prefill leaves it out (``mor.infer.runner.PREFILL_ATTENTION``), and
the "cudnn" arm puts it back for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from decode_throughput import SHAPES
from torch.nn.attention import SDPBackend

from mor import MoRConfig, MoRForCausalLM
from mor.infer import runner
from mor.infer.engine import Engine

ARMS = {"cudnn": [SDPBackend.CUDNN_ATTENTION, *runner.PREFILL_ATTENTION], "no cudnn": runner.PREFILL_ATTENTION}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="360m", choices=sorted(SHAPES))
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark measures cuDNN on a CUDA device")
    torch.manual_seed(0)
    model = MoRForCausalLM(MoRConfig.from_preset(SHAPES[args.shape])).cuda().to(torch.bfloat16).eval()
    engine = Engine(model, max_batch_slots=4, max_seq_len=512, loop_prompt_tokens=0)

    def milliseconds(lengths: list[int]) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.generate([list(range(1, n + 1)) for n in lengths], 1)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    milliseconds([40])  # warm-up
    results = {}
    for arm, backends in ARMS.items():
        runner.PREFILL_ATTENTION = backends
        results[arm] = dict(new_lengths=[milliseconds([n]) for n in range(100, 108)],
                            same_lengths=[milliseconds([n]) for n in range(100, 108)],
                            ragged_pairs=[milliseconds([n, n - 7]) for n in range(120, 126)])
        print(arm, {k: [round(x) for x in v] for k, v in results[arm].items()}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                command="prefill_shapes.py " + " ".join(sys.argv[1:]))
    (out / "prefill_shapes.json").write_text(json.dumps(dict(meta=meta, results_ms=results), indent=1))


if __name__ == "__main__":
    main()
