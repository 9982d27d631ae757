"""What a prefill costs: the engine's batched prefill (``PagedPrefill``) against the per-layer paged path
(``PagedRows``, what ``generate`` uses) on the same prompts.

For each path: wall time per prefill (median of ``--repeats``, after a warm-up), the tensor operations it runs
(each a kernel launch on a GPU) and, on a GPU, the times the host waits for the device (stream and device
synchronisations, which reads of device values and blocking copies make), both counted with ``torch.profiler``.
The cache is built before the timing. Random weights; MoR models get the decoding benchmark's calibrated exits.

    python benchmarks/prefill_host.py --device cpu --shape tiny --layers 34       # seconds
    python benchmarks/prefill_host.py --shape 360m --models vanilla,mor-4 --prompts 8 --tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from decode_throughput import MODELS, SHAPES, calibrate_exits

from mor import MoRConfig, MoRForCausalLM
from mor.infer.page_pool import PagedCache

SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}  # the host waits
VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::transpose", "aten::t",
         "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::narrow",
         "aten::flatten", "aten::permute", "aten::_unsafe_view", "aten::alias", "aten::detach", "aten::lift_fresh",
         "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::resolve_conj", "aten::resolve_neg",
         "aten::split", "aten::chunk", "aten::unbind", "aten::split_with_sizes", "aten::expand_as", "aten::view_as",
         "aten::contiguous", "aten::to", "aten::linear", "aten::matmul", "aten::result_type", "aten::item",
         "aten::scaled_dot_product_attention", "aten::_has_compatible_shallow_copy_type", "aten::is_nonzero"}


def prefill(model: MoRForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None, path: str,
            cache: PagedCache) -> None:
    rows = list(range(ids.shape[0]))
    with torch.no_grad():
        if path == "per-layer":
            model.model(ids, attention_mask=mask, routing="causal", cache=cache.view(rows))
        else:
            batch = cache.prefill(rows)
            model.model(ids, attention_mask=mask, routing="causal", cache=batch)
            batch.commit()


def measure(model: MoRForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None, path: str, repeats: int) -> dict:
    cuda = ids.device.type == "cuda"
    caches = [PagedCache.for_model(model, ids.shape[0], ids.shape[1] + 1) for _ in range(repeats + 2)]
    prefill(model, ids, mask, path, caches.pop())  # warm-up
    times = []
    for _ in range(repeats):
        cache = caches.pop()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        prefill(model, ids, mask, path, cache)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    with torch.profiler.profile() as prof:
        prefill(model, ids, mask, path, caches.pop())
    events = prof.key_averages()
    return dict(ms=1e3 * statistics.median(times),
                operations=sum(e.count for e in events if e.key.startswith("aten::") and e.key not in VIEWS),
                synchronisations=sum(e.count for e in events if e.key in SYNCS) if cuda else None)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="360m", choices=sorted(SHAPES))
    parser.add_argument("--models", default="vanilla,mor-4", help=f"comma-separated of {', '.join(MODELS)}")
    parser.add_argument("--layers", type=int, help="override the number of layers (vanilla)")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="tokens of the longest prompt")
    parser.add_argument("--ragged", action="store_true", help="prompts of different lengths (a padding mask)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    records = []
    print(f"{'model':<10} {'path':<13} {'ms':>8} {'operations':>11} {'syncs':>6}")
    for name in args.models.split(","):
        overrides = dict(MODELS[name])
        if args.layers and name == "vanilla":
            overrides["num_hidden_layers"] = args.layers
        torch.manual_seed(0)
        model = MoRForCausalLM(MoRConfig.from_preset(SHAPES[args.shape], **overrides)).to(device).eval()
        if model.model.expert is not None:
            calibrate_exits(model, 8, min(512, model.config.max_position_embeddings), 0)
        model = model.to(dtype)
        ids = torch.randint(0, model.config.vocab_size, (args.prompts, args.tokens), device=device)
        mask = None
        if args.ragged:
            mask = torch.ones_like(ids)
            for i in range(args.prompts):
                mask[i, : i * args.tokens // (2 * args.prompts)] = 0
        for path in ("per-layer", "prompt batch"):
            record = dict(model=name, path=path, **measure(model, ids, mask, path, args.repeats))
            records.append(record)
            syncs = record["synchronisations"]
            print(f"{name:<10} {path:<13} {record['ms']:>8.1f} {record['operations']:>11,} "
                  f"{'-' if syncs is None else syncs:>6}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else cpu_name(), torch=torch.__version__,
                threads=torch.get_num_threads(), shape=args.shape, prompts=args.prompts, tokens=args.tokens,
                ragged=args.ragged, command="prefill_host.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    (out / "prefill_host.json").write_text(json.dumps({"meta": meta, "results": records}, indent=1))
    return records


if __name__ == "__main__":
    main()
