"""The engine's host time per round trip: admission, the window choice, the launch and reading a window back.

At large batches the host can be what the device waits for: a round trip admits new requests, picks and launches
the next window, then reads the previous window's status and turns it into per-request tokens (`Engine.step`).
This benchmark serves many short requests through the engine and times each of those parts by wall clock (on a
GPU the read-back also waits for the window in flight; `profile_engine.py` separates that wait). Random weights;
MoR models get the decoding benchmark's calibrated exits.

    python benchmarks/engine_host.py --device cpu                       # tiny MoR-4, 512 rows, seconds
    python benchmarks/engine_host.py --shape 360m --rows 512 --requests 2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from decode_throughput import MODELS, SHAPES, calibrate_exits
from prefill_host import cpu_name

from mor import MoRConfig, MoRForCausalLM
from mor.infer.engine import Engine

PARTS = {"engine._admit": ("engine", "_admit"), "scheduler.window": ("scheduler", "window"),
         "runner.launch": ("runner", "launch"), "engine._collect": ("engine", "_collect"),
         "runner.release": ("runner", "release")}


def timed_parts(engine: Engine) -> dict[str, list[float]]:
    """Wrap each part of a round trip with a wall-clock timer; the lists fill as the engine runs."""
    times: dict[str, list[float]] = {name: [] for name in PARTS}
    owners = {"engine": engine, "scheduler": engine.scheduler, "runner": engine.runner}
    for name, (owner, method) in PARTS.items():
        original = getattr(owners[owner], method)

        def part(*args, _original=original, _times=times[name]):
            start = time.perf_counter()
            result = _original(*args)
            _times.append(time.perf_counter() - start)
            return result

        setattr(owners[owner], method, part)
    return times


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--model", default="mor-4", choices=sorted(MODELS))
    parser.add_argument("--rows", type=int, default=512, help="requests in flight at once (the batch)")
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--tokens", default="8,40", help="generation lengths, uniform in [LOW, HIGH)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    args = parser.parse_args(argv)
    low, high = map(int, args.tokens.split(","))
    torch.manual_seed(args.seed)
    config = MoRConfig.from_preset(SHAPES[args.shape], **MODELS[args.model])
    model = MoRForCausalLM(config).to(args.device).eval()
    if model.model.expert is not None:
        calibrate_exits(model, 4, 64, args.seed)
    if args.device != "cpu":
        model = model.to(torch.bfloat16)
    cuda = args.device.startswith("cuda")
    engine = Engine(model, max_batch_slots=args.rows, max_seq_len=high + 8, cuda_graphs=cuda)
    engine.generate([[1]] * min(args.rows, 64), 4, do_sample=True, seed=args.seed)  # warm-up (compile, capture)
    lengths = np.random.default_rng(args.seed).integers(low, high, args.requests).tolist()
    times = timed_parts(engine)
    start = time.perf_counter()
    out = engine.generate([[1]] * args.requests, lengths, do_sample=True, seed=args.seed)
    wall = time.perf_counter() - start
    tokens = sum(len(r.tokens) for r in out.results)
    rows = {name: dict(calls=len(v), ms_per_call=1e3 * sum(v) / max(len(v), 1), total_ms=1e3 * sum(v))
            for name, v in times.items()}
    device = torch.cuda.get_device_name() if cuda else cpu_name()
    print(f"{args.shape} {args.model}, {args.rows} rows, {args.requests} requests, {tokens} tokens in {wall:.2f} s "
          f"on {device} ({torch.get_num_threads()} threads)")
    print(f"{'part':18s} {'calls':>6s} {'ms/call':>9s} {'total ms':>9s}")
    for name, row in rows.items():
        print(f"{name:18s} {row['calls']:6d} {row['ms_per_call']:9.3f} {row['total_ms']:9.1f}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device, threads=torch.get_num_threads(), torch=torch.__version__,
                argv=sys.argv[1:] if argv is None else argv,
                tokens=tokens, wall_s=wall)
    (out_dir / "engine_host.json").write_text(json.dumps(dict(meta=meta, parts=rows), indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
