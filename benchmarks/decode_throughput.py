"""Decoding throughput of MoR against vanilla Transformers with continuous (depth-wise) batching.

The paper's protocol (MOR_SPEC 11.10): a queue of N requests (default 1000), each generating a number of tokens
drawn from a normal distribution (mean 256, std 32 here: the paper gives only the mean), starting from a single
token and no prompt; tokens/s normalised to the vanilla model of the same effective depth (MoR-4 of the 360M
shape has 34 unrolled layers, so it is compared with a 34-layer vanilla model, as in the paper). Every model runs
in the same engine (``mor.infer.engine``): MoR with depth-wise batching, vanilla with sequence-wise continuous
batching. The peer baseline is ``transformers`` ``generate`` with a static cache on the same vanilla weights
(static batches of B requests, each running to the longest length in its batch; only requested tokens count).

Batch settings: ``--batch 32,max``. ``max`` is the paper's relative maximum batch (42, 48, 51 for Nr = 2, 3, 4):
``--base-batch`` (32) over the KV memory of the recursion block relative to vanilla layers ((Nr+1)/2Nr for
recursion-wise caching, 1/Nr for sharing); the unique first and last layers are not counted, as in the paper.

Exits come from a trained checkpoint (``--checkpoint NAME=DIR``) or, for randomly initialised models, from
routers calibrated so that a 1/Nr share of tokens exits at each depth: each router after the first gets a bias
from quantiles of its logits on random-token prefill (causal mode). Tokens are sampled (temperature 1), so a
random model's hidden states stay varied. The output says which applies and reports the depth histogram reached.

    python benchmarks/decode_throughput.py --out bench-out             # full run, CUDA, bf16
    python benchmarks/decode_throughput.py --quick                     # a couple of minutes on an H100
    python benchmarks/decode_throughput.py --device cpu --quick        # tiny shapes, seconds (smoke test)

Timing covers the whole serving loop (scheduling, KV page management, sampling), after a warm-up run that also
captures the CUDA graphs; the paper timed the forward passes only. Beside each row the benchmark prints a roofline
step time: the weights every iteration must read, plus the keys/values its tokens attend to, over the memory
bandwidth, plus the useful matrix work over the matrix rate (``--bandwidth``, ``--matmul-rate``: an H200's
measured copy bandwidth and bf16 matrix rate by default).

``--ablate`` runs each routed model again with one source of its speed switched off: ``lockstep`` (no depth-wise
batching: a batch's tokens leave the block together), ``full-depth`` (every token runs every recursion: no fewer
layer passes, no smaller KV reads), ``gather`` (attention over a padded gather of the pages instead of the paged
kernel), ``eager`` (no CUDA graphs, no compilation).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mor import MoRConfig, MoRForCausalLM
from mor.infer.engine import Engine

SHAPES = {"360m": "smollm-360m", "135m": "smollm-135m", "tiny": "tiny-8l"}
MODELS = {
    "vanilla": {},
    "mor-2": dict(sharing="middle_cycle", num_recursions=2, router="expert"),
    "mor-3": dict(sharing="middle_cycle", num_recursions=3, router="expert"),
    "mor-4": dict(sharing="middle_cycle", num_recursions=4, router="expert"),
    "mor-3-share": dict(sharing="middle_cycle", num_recursions=3, router="expert", kv_cache="share"),
    "recursive-3": dict(sharing="middle_cycle", num_recursions=3),
}
DEFAULT_MODELS = ["vanilla", "mor-2", "mor-3", "mor-4", "mor-3-share"]
ABLATIONS = ("lockstep", "full-depth", "gather", "eager")
QUICK_MODELS = ["vanilla", "mor-3", "mor-3-share"]


@dataclass
class Spec:
    shape: str
    name: str
    config: MoRConfig
    peer: str  # the vanilla model it is normalised to
    checkpoint: str | None = None
    results: list[dict] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                        help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--shapes", default=None, help="comma-separated of 360m,135m,tiny (default 360m,135m; "
                                                       "CPU quick: tiny)")
    parser.add_argument("--models", default=None, help=f"comma-separated of {', '.join(MODELS)} (default "
                                                       f"{','.join(DEFAULT_MODELS)}); depth-matched vanilla "
                                                       "models are added as needed")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="use a trained checkpoint (save_pretrained folder) for model NAME; repeatable")
    parser.add_argument("--requests", type=int, default=None, help="requests in the queue (default 1000)")
    parser.add_argument("--mean-tokens", type=float, default=None, help="mean generation length (default 256)")
    parser.add_argument("--std-tokens", type=float, default=None, help="std of the generation length (default 32)")
    parser.add_argument("--batch", default="32,max", help="comma-separated batch sizes and/or 'max'")
    parser.add_argument("--base-batch", type=int, default=32, help="vanilla batch that defines 'max'")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=8, help="iterations per host round trip at most")
    parser.add_argument("--tail-slots", default=None,
                        help="tokens sampled per iteration at most: a number, or 'depth' for 1.25 x batch / the "
                             "expected mean depth (default: the batch)")
    parser.add_argument("--ablate", default="", help=f"comma-separated of {', '.join(ABLATIONS)}")
    parser.add_argument("--bandwidth", type=float, default=4.3e12, help="memory bandwidth, bytes/s (roofline)")
    parser.add_argument("--matmul-rate", type=float, default=7.9e14, help="matrix FLOP/s (roofline)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run the engine eagerly on CUDA")
    parser.add_argument("--no-compile", action="store_true", help="do not fuse the engine's layers with "
                                                                   "torch.compile (CUDA graphs only)")
    parser.add_argument("--no-kernel", action="store_true", help="attention over a padded gather of the pages")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers generate baseline")
    parser.add_argument("--hf-requests", type=int, default=None,
                        help="requests for the transformers baseline (default 4 batches' worth)")
    parser.add_argument("--calibration-rows", type=int, default=8, help="random rows used to calibrate exits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small subset that finishes in a few minutes")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-out", help="directory for the JSON")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    quick_cpu = args.quick and cpu
    defaults = dict(
        dtype="float32" if cpu else "bfloat16",
        shapes="tiny" if quick_cpu else "360m" if args.quick else "360m,135m",
        models=",".join(QUICK_MODELS if args.quick else DEFAULT_MODELS),
        requests=12 if quick_cpu else 96 if args.quick else 1000,
        mean_tokens=12 if quick_cpu else 64 if args.quick else 256,
        std_tokens=3 if quick_cpu else 8 if args.quick else 32,
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if quick_cpu and args.batch == "32,max":
        args.batch, args.base_batch = "4,max", 4
    return args


# ---------------------------------------------------------------------------------------------- models
def specs(args: argparse.Namespace) -> list[Spec]:
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    out: list[Spec] = []
    for shape in args.shapes.split(","):
        preset = SHAPES[shape]
        base = MoRConfig.from_preset(preset)
        chosen: list[Spec] = []
        for name in args.models.split(","):
            config = MoRConfig.from_preset(preset, **MODELS[name])
            depth = config.num_effective_layers
            peer = "vanilla" if depth == base.num_hidden_layers else f"vanilla-{depth}L"
            chosen.append(Spec(shape, name, config, peer, checkpoints.get(name)))
        needed = {s.peer for s in chosen} - {s.name for s in chosen}
        vanillas = [Spec(shape, peer, MoRConfig.from_preset(preset, num_hidden_layers=_layers(peer, base)), peer,
                         checkpoints.get(peer)) for peer in sorted(needed)]
        out += sorted(vanillas + chosen, key=lambda s: not s.name.startswith("vanilla"))  # peers first
    return out


def _layers(name: str, base: MoRConfig) -> int:
    return base.num_hidden_layers if name == "vanilla" else int(name[len("vanilla-"):-1])


def build(spec: Spec, device: str, dtype: torch.dtype, args: argparse.Namespace) -> tuple[MoRForCausalLM, str]:
    """The model in eval mode and where its exits come from."""
    if spec.checkpoint:
        model = MoRForCausalLM.from_pretrained(spec.checkpoint, map_location=device).eval()
        source = f"trained routers ({spec.checkpoint})"
    else:
        torch.manual_seed(args.seed)
        model = MoRForCausalLM(spec.config).to(device).eval()
        source = "fixed depth"
        if model.model.expert is not None:
            calibrate_exits(model, args.calibration_rows, min(512, model.config.max_position_embeddings), args.seed)
            source = "calibrated routers (1/Nr exits per depth from quantiles of router logits on random prefill)"
    return model.to(dtype), source


@torch.no_grad()
def calibrate_exits(model: MoRForCausalLM, rows: int, seq_len: int, seed: int) -> None:
    """Bias each expert router after the first so that, in causal mode on random tokens, the fraction of tokens
    that continue from step r to r+1 is (Nr - r)/(Nr - r + 1): a 1/Nr share of tokens then exits at every depth
    (the capacities (Nr - r + 1)/Nr the routers were meant to learn)."""
    cfg, expert = model.config, model.model.expert
    nr = cfg.num_recursions
    device = model.lm_head.weight.device
    ids = torch.randint(0, cfg.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(seed))
    threshold = math.log(cfg.causal_threshold / (1 - cfg.causal_threshold))
    for step in range(1, nr):
        router = expert.routers[step]
        seen: list[torch.Tensor] = []
        hook = router.register_forward_hook(lambda _m, _i, out, seen=seen: seen.append(out.float().flatten()))
        for row in ids:  # one row at a time: no padded candidate slots
            model(row[None].to(device), routing="causal")
        hook.remove()
        keep = (nr - step) / (nr - step + 1)
        cut = torch.quantile(torch.cat(seen), 1 - keep).item()
        _add_bias(router, threshold - cut)


def _add_bias(router: torch.nn.Module, bias: float) -> None:
    """Add ``bias`` to the router's logit: its last linear layer becomes one with a bias."""
    net = router.net
    last = net if isinstance(net, torch.nn.Linear) else net[-1]
    biased = torch.nn.Linear(last.in_features, last.out_features, bias=True).to(last.weight)
    biased.weight.data.copy_(last.weight.data)
    biased.bias.data.fill_(bias + (0.0 if last.bias is None else last.bias.item()))
    if isinstance(net, torch.nn.Linear):
        router.net = biased
    else:
        net[-1] = biased


def relative_max_batch(config: MoRConfig, base_batch: int) -> int:
    """The paper's B = Max (MOR_SPEC 7.3, 11.10): ``base_batch`` over the recursion block's KV memory relative to
    vanilla layers, (Nr+1)/2Nr for recursion-wise caching (42, 48, 51 for Nr = 2, 3, 4 at 32) and 1/Nr for
    sharing. As in the paper's figures, the unique first and last layers (full caches) are not counted; counting
    them would give 46 for MoR-3 and 49 for MoR-4 of the 360M shape."""
    if config.sharing == "none":
        return base_batch
    full = config.recursion_block_size * config.num_recursions
    return max(1, math.floor(base_batch * full / block_entries_per_token(config) + 1e-9))  # 1.999... is 2


def block_entries_per_token(config: MoRConfig) -> float:
    """Expected key/value entries a token writes in the recursion block (MOR_SPEC 7): recursion-wise caching
    writes at step r for the c_r share of tokens that run it; sharing writes at step 1 only."""
    block = config.recursion_block_size
    if config.kv_cache == "share":
        return float(block)
    return block * (sum(config.step_capacities) if config.router == "expert" else config.num_recursions)


def block_ratio_target(config: MoRConfig) -> float:
    if config.router != "expert":
        return 1.0 / config.num_recursions if config.kv_cache == "share" else 1.0
    if config.kv_cache == "share":
        return 1.0 / config.num_recursions
    return sum(config.step_capacities) / config.num_recursions


# ---------------------------------------------------------------------------------------------- measurement
def generation_lengths(n: int, mean: float, std: float, seed: int) -> list[int]:
    lengths = torch.normal(mean, std, (n,), generator=torch.Generator().manual_seed(seed)).round()
    return lengths.clamp(1, 2 * mean).long().tolist()


def expected_depth(config: MoRConfig) -> float:
    """Mean block passes per token the routers are meant to give (capacities; balanced token-choice)."""
    if config.router == "expert":
        return sum(config.step_capacities)
    return (config.num_recursions + 1) / 2 if config.router == "token" else 1.0


def tail_slots(setting: str | None, config: MoRConfig, batch: int) -> int | None:
    if setting is None:
        return None
    if setting == "depth":
        return min(batch, math.ceil(1.25 * batch / expected_depth(config)))
    return int(setting)


def run_engine(model: MoRForCausalLM, lengths: list[int], batch: int, args: argparse.Namespace,
               ablation: str | None = None) -> dict:
    cuda = args.device.startswith("cuda")
    start_token = model.config.bos_token_id if model.config.bos_token_id is not None else \
        (model.config.eos_token_id or 0)
    eager = ablation == "eager"
    graphs = cuda and not args.no_cuda_graphs and not eager
    torch.compiler.reset()  # each engine compiles afresh (its graphs are captured below and never recompiled)
    threshold = model.config.causal_threshold
    if ablation == "full-depth":
        model.config.causal_threshold = 1e-30  # every router says continue
    try:
        engine = Engine(model, max_batch_slots=batch, max_seq_len=1 + max(lengths), page_size=args.page_size,
                        cuda_graphs=graphs, compile=graphs and not args.no_compile,
                        kernel=not args.no_kernel and ablation != "gather", window=args.window,
                        tail_slots=tail_slots(args.tail_slots, model.config, batch), lockstep=ablation == "lockstep")
        warmup = time.perf_counter()
        engine.generate([[start_token]] * (2 * batch), [min(16, max(lengths))] * (2 * batch), do_sample=True,
                        seed=args.seed)
        warmup = time.perf_counter() - warmup
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with GpuBusy(engine) as busy:
            out = engine.generate([[start_token]] * len(lengths), lengths, do_sample=True, temperature=1.0,
                                  seed=args.seed, progress=True)
    finally:
        model.config.causal_threshold = threshold
    s = out.stats
    ttft = sorted(r.time_to_first_token for r in out.results)
    depths = sum((d * c for d, c in s.depth_histogram.items()), 0) / max(s.tokens, 1)
    roof = roofline(model, engine, out, args)
    record = dict(
        batch=batch, tokens=s.tokens, seconds=s.seconds, tokens_per_s=s.tokens_per_second,
        mean_depth=depths, depth_histogram={str(k): v for k, v in s.depth_histogram.items()},
        block_occupancy=s.block_occupancy, iterations=s.iterations, windows=s.windows,
        mean_tail_batch=s.mean_tail_batch, tail_slots=engine.runner.tail_slots, preemptions=s.preemptions,
        step_ms=1e3 * s.seconds / max(s.iterations, 1), roofline_step_ms=1e3 * roof / max(s.iterations, 1),
        ttft_median_s=ttft[len(ttft) // 2], kv_bytes_per_token=s.kv_bytes_per_token,
        kv_block_ratio=s.kv_block_ratio, kv_model_ratio=s.kv_model_ratio,
        kv_block_ratio_target=block_ratio_target(model.config), kv_peak_bytes=s.kv_peak_bytes,
        kv_pool_bytes=s.kv_allocated_bytes, warmup_s=warmup, cuda_graphs=engine.cuda_graphs,
        compiled=engine.compiled, paged_kernel=engine.runner.kernel, window=args.window,
    )
    if busy.seconds is not None:
        record["gpu_busy"] = busy.seconds / s.seconds
    if ablation:
        record["ablation"] = ablation
    if cuda:
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return record


class GpuBusy:
    """Device time of the engine's windows (CUDA events around each launch), to compare with the wall time."""

    def __init__(self, engine: Engine) -> None:
        self.runner = engine.runner
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.seconds: float | None = None

    def __enter__(self) -> "GpuBusy":
        if self.runner.device.type != "cuda":
            return self
        launch = self.runner.launch

        def timed(size: int, mode: str):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            window = launch(size, mode)
            end.record()
            self.events.append((begin, end))
            return window

        self.runner.launch = timed
        return self

    def __exit__(self, *exc) -> None:
        if self.runner.device.type != "cuda":
            return
        del self.runner.launch  # back to the class's method
        torch.cuda.synchronize()
        self.seconds = sum(begin.elapsed_time(end) for begin, end in self.events) / 1e3


def roofline(model: MoRForCausalLM, engine: Engine, out, args: argparse.Namespace) -> float:
    """Seconds the run needs at least: every iteration reads the weights it runs (block, unique layers, head) once,
    every token reads the keys/values it attends to, and the useful matrix products run at the matrix rate."""
    cfg, plan = model.config, model.model.plan
    size = model.lm_head.weight.element_size()
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    block, unique = len(engine.runner.steps[0]), len(plan.prelude) + len(plan.coda)
    head = cfg.vocab_size * cfg.hidden_size
    weights = ((block + unique) * layer + head) * size
    share = cfg.kv_cache == "share"
    entries = 0  # keys/values attended to, over every layer
    for result in out.results:
        reached = [0] * (max(result.depths, default=0) + 1)  # tokens so far that reached each depth
        for t, depth in enumerate(result.depths):
            for r in range(1, depth + 1):
                reached[r] += 1
                entries += block * ((t + 1) if share else reached[r])
            entries += unique * (t + 1)
    entry = 2 * cfg.num_key_value_heads * cfg.head_dim * size
    passes = sum(sum(r.depths) for r in out.results)
    tokens = out.stats.tokens
    flops = 2 * (passes * block * layer + tokens * (unique * layer + head))
    return (out.stats.iterations * weights + entries * entry) / args.bandwidth + flops / args.matmul_rate


def hf_llama(model: MoRForCausalLM) -> torch.nn.Module:
    """``transformers.LlamaForCausalLM`` with the weights of a vanilla model."""
    import transformers

    from mor.interop.llama import config_to_hf

    weight = model.lm_head.weight
    fields = config_to_hf(model.config, model.config.num_hidden_layers, weight.dtype)
    config = transformers.LlamaConfig(**{k: v for k, v in fields.items()
                                         if k not in ("architectures", "model_type", "torch_dtype")})
    hf = transformers.LlamaForCausalLM(config).to(device=weight.device, dtype=weight.dtype).eval()
    hf.load_state_dict(model.state_dict())
    return hf


@torch.no_grad()
def run_hf(model: MoRForCausalLM, lengths: list[int], batch: int, args: argparse.Namespace) -> dict:
    """``generate`` with one pre-allocated ``StaticCache`` as long as the longest request, reset for every batch
    of ``batch`` requests: every batch has the same shapes, so the forward that ``transformers`` compiles for a
    static cache on CUDA (CUDA graphs included) is compiled once, during the warm-up."""
    from transformers import StaticCache

    hf = hf_llama(model)
    device = model.lm_head.weight.device
    start_token = model.config.bos_token_id if model.config.bos_token_id is not None else \
        (model.config.eos_token_id or 0)
    count = min(len(lengths), args.hf_requests or 4 * batch)
    batch = min(batch, count)
    lengths = lengths[:count // batch * batch]  # whole batches: one cache shape
    cache = StaticCache(config=hf.config, max_cache_len=1 + max(lengths))
    # min_new_tokens = max_new_tokens: every request runs to its length, as in the engine.
    # Newer transformers name the cache argument ``cache`` (``past_key_values`` is deprecated there).
    cache_argument = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    common = {"do_sample": True, "temperature": 1.0, "top_k": 0, cache_argument: cache,
              "pad_token_id": model.config.pad_token_id or 0}

    def generate(rows: int, new: int) -> None:
        cache.reset()
        ids = torch.full((rows, 1), start_token, device=device)
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, **common)

    for _ in range(2):  # warm-up: compilation and graph capture
        generate(batch, min(16, max(lengths)))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    generated = 0
    for first in range(0, len(lengths), batch):
        group = lengths[first:first + batch]
        generate(len(group), max(group))
        generated += len(group) * max(group)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    useful = sum(lengths)
    return dict(batch=batch, requests=len(lengths), tokens=useful, seconds=seconds, tokens_per_s=useful / seconds,
                raw_tokens_per_s=generated / seconds, compiled=device.type == "cuda")


# ---------------------------------------------------------------------------------------------- reporting
def write_json(path: Path, meta: dict, records: list[dict]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": records}, indent=2))
    tmp.replace(path)


def normalise(records: list[dict]) -> None:
    """``speedup``: tokens/s over the depth-matched vanilla model in the same batch setting (vanilla's 'max'
    is its base batch)."""
    for r in records:
        if "tokens_per_s" not in r or r["model"].startswith("hf-"):
            continue
        peer = next((p for p in records if p["shape"] == r["shape"] and p["model"] == r["peer"]
                     and p["batch_size"] == r["batch_size"] and "tokens_per_s" in p and "ablation" not in p), None)
        if peer:
            r["speedup"] = r["tokens_per_s"] / peer["tokens_per_s"]


def print_table(records: list[dict]) -> None:
    header = (f"{'shape':<6} {'model':<24} {'batch':<8} {'B':>4} {'tok/s':>10} {'speedup':>8} {'depth':>6} "
              f"{'occup':>6} {'step ms':>8} {'roof ms':>8} {'KV blk':>7} {'target':>7} {'KV B/tok':>9}")
    print("\n" + header + "\n" + "-" * len(header))
    for r in records:
        name = r["model"] + (f" -{r['ablation']}" if "ablation" in r else "")
        if "error" in r:
            print(f"{r['shape']:<6} {name:<24} {r.get('batch_size', ''):<8} error: {r['error'][:70]}")
            continue
        print(f"{r['shape']:<6} {name:<24} {r['batch_size']:<8} {r['batch']:>4} {r['tokens_per_s']:>10,.0f} "
              f"{_fmt(r, 'speedup', '.2f'):>8} {_fmt(r, 'mean_depth', '.2f'):>6} "
              f"{_fmt(r, 'block_occupancy', '.2f'):>6} {_fmt(r, 'step_ms', '.3f'):>8} "
              f"{_fmt(r, 'roofline_step_ms', '.3f'):>8} {_fmt(r, 'kv_block_ratio', '.3f'):>7} "
              f"{_fmt(r, 'kv_block_ratio_target', '.3f'):>7} {_fmt(r, 'kv_bytes_per_token', ',.0f'):>9}")


def _fmt(record: dict, key: str, spec: str) -> str:
    return format(record[key], spec) if key in record else "-"


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "decode_throughput.json"
    lengths = generation_lengths(args.requests, args.mean_tokens, args.std_tokens, args.seed)
    meta = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                torch=torch.__version__, dtype=args.dtype, requests=args.requests, mean_tokens=args.mean_tokens,
                std_tokens=args.std_tokens, seed=args.seed, page_size=args.page_size,
                argv=sys.argv[1:] if argv is None else argv,
                timing="whole serving loop after a warm-up run (scheduling, KV pages, sampling included)")
    records: list[dict] = []
    settings = args.batch.split(",")
    for spec in specs(args):
        record_base = dict(shape=spec.shape, model=spec.name, peer=spec.peer,
                           effective_layers=spec.config.num_effective_layers,
                           kv_cache=spec.config.kv_cache, num_recursions=spec.config.num_recursions)
        try:
            model, source = build(spec, args.device, dtype, args)
        except Exception as error:  # keep the other models
            traceback.print_exc()
            records.append(dict(record_base, batch_size="-", error=f"{type(error).__name__}: {error}"))
            write_json(path, meta, records)
            continue
        record_base.update(exits=source, non_embedding_params=model.num_parameters(exclude_embeddings=True))
        measured: dict[int, list[dict]] = {}  # batch size -> its records (vanilla's 'max' is its base batch)
        for setting in settings:
            batch = args.base_batch if setting == "max" and spec.name.startswith("vanilla") else \
                relative_max_batch(model.config, args.base_batch) if setting == "max" else int(setting)
            if batch in measured:  # the same run under another setting's name
                records += [dict(r, batch_size=setting) for r in measured[batch]]
                continue
            record = dict(record_base, batch_size=setting)  # the setting; 'batch' is the size
            try:
                record.update(run_engine(model, lengths, batch, args))
            except Exception as error:
                traceback.print_exc()
                record.update(batch=batch, error=f"{type(error).__name__}: {error}")
            records.append(record)
            measured[batch] = [record]
            normalise(records)
            write_json(path, meta, records)
            print(json.dumps({k: v for k, v in record.items() if k != "depth_histogram"}), flush=True)
            routed = model.config.router != "none"
            for ablation in filter(None, args.ablate.split(",")):
                if ablation not in ABLATIONS:
                    raise SystemExit(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
                if not routed and ablation in ("lockstep", "full-depth"):
                    continue  # nothing to switch off without a router
                ablated = dict(record_base, batch_size=setting)
                try:
                    ablated.update(run_engine(model, lengths, batch, args, ablation))
                except Exception as error:
                    traceback.print_exc()
                    ablated.update(batch=batch, ablation=ablation, error=f"{type(error).__name__}: {error}")
                records.append(ablated)
                measured[batch].append(ablated)
                normalise(records)
                write_json(path, meta, records)
                print(json.dumps({k: v for k, v in ablated.items() if k != "depth_histogram"}), flush=True)
            if spec.name == "vanilla" and not args.no_hf and "error" not in record:
                hf_record = dict(shape=spec.shape, model="hf-static", peer="vanilla", batch_size=setting)
                try:
                    hf_record.update(run_hf(model, lengths, batch, args))
                    hf_record["speedup"] = hf_record["tokens_per_s"] / record["tokens_per_s"]  # vs our vanilla
                except Exception as error:
                    traceback.print_exc()
                    hf_record.update(batch=batch, error=f"{type(error).__name__}: {error}")
                records.append(hf_record)
                measured[batch].append(hf_record)
                write_json(path, meta, records)
                print(json.dumps(hf_record), flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print_table(records)
    print(f"\nexits: {', '.join(sorted({r['exits'] for r in records if 'exits' in r}))}")
    print(f"wrote {path}")
    return records


if __name__ == "__main__":
    main()
