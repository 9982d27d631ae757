"""The fused sampling kernel's launch shape: chunk width and warps, timed per call, against the PyTorch path.

    python benchmarks/sampler_kernel.py [--vocab 49152] [--rows 17,51,128,512]

For each row count, every (chunk, warps) pair draws from the same bf16 logits (rows at temperature 1, as the
decode benchmark samples, and one greedy row in eight) and must return the PyTorch path's tokens. The table gives
device microseconds per call (100 calls in one CUDA graph) and marks the fastest. ``mor.infer.sampling.CHUNK``
and ``CHUNK_WARPS`` are the engine's choice, also timed with a third of the rows active (the others skipped), as in
a MoR iteration's tail.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mor.infer import sampling

CHUNKS = (1024, 2048, 4096, 8192)
WARPS = (4, 8, 16)


def microseconds(fn, calls: int = 100) -> float:
    """Device time per call: ``calls`` calls captured in one CUDA graph (so the host's launch cost is left out),
    the replay timed with CUDA events, best of 5."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", default="17,51,128,512")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark times a CUDA kernel")
    chunk_and_warps = sampling.CHUNK, sampling.CHUNK_WARPS
    results = []
    for n in map(int, args.rows.split(",")):
        g = torch.Generator(device="cuda").manual_seed(n)
        logits = torch.randn(n, args.vocab, device="cuda", generator=g).to(torch.bfloat16) * 4
        temperature = (torch.arange(n, device="cuda") % 8 > 0).float()  # one greedy row in eight
        seed = torch.randint(0, 2**40, (n,), device="cuda", generator=g)
        counter = torch.arange(n, device="cuda")
        top_k, top_p = torch.full((n,), args.vocab, device="cuda"), torch.ones(n, device="cuda")
        call = (logits, temperature, top_k, top_p, seed, counter, "sample")
        expected = sampling.sample_rows(*call)
        row = dict(rows=n, vocab=args.vocab, pytorch_us=microseconds(lambda: sampling.sample_rows(*call)), kernel={})
        for chunk in CHUNKS:
            for warps in WARPS:
                sampling.CHUNK, sampling.CHUNK_WARPS = chunk, warps
                equal = torch.equal(sampling.sample_rows(*call, kernel=True), expected)
                row["kernel"][f"{chunk}x{warps}"] = dict(
                    us=microseconds(lambda: sampling.sample_rows(*call, kernel=True)), equal=equal)
        # The engine's shape with a third of the rows wanting a token, as in a MoR iteration's tail
        sampling.CHUNK, sampling.CHUNK_WARPS = chunk_and_warps
        active = torch.arange(n, device="cuda") % 3 == 0
        row["engine_third_active_us"] = microseconds(lambda: sampling.sample_rows(*call, kernel=True, active=active))
        best = min(row["kernel"], key=lambda k: row["kernel"][k]["us"])
        print(f"rows {n}: PyTorch path {row['pytorch_us']:.1f} us; kernel (chunk x warps): " + ", ".join(
            f"{k} {v['us']:.1f}{'' if v['equal'] else ' (DIFFERS)'}{' *' if k == best else ''}"
            for k, v in row["kernel"].items()) + f"; engine's with a third active {row['engine_third_active_us']:.1f}",
              flush=True)
        results.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                command="python benchmarks/sampler_kernel.py " + f"--vocab {args.vocab} --rows {args.rows}")
    (out / "sampler_kernel.json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))


if __name__ == "__main__":
    main()
