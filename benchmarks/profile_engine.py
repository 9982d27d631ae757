"""Where the serving loop's time goes: host time per part of a round trip, the device's busy share, and the top GPU
kernels of a short run.

    python benchmarks/profile_engine.py --shape 135m --model vanilla --batch 128
    python benchmarks/profile_engine.py --shape 360m --model mor-3 --batch 512 --requests 1024 --mean-tokens 128
    python benchmarks/profile_engine.py --shape 360m --model mor-4 --batch 128 --requests 400 --prompt-tokens 128

Builds the model as ``decode_throughput.py`` does (calibrated routers for MoR), warms the engine up, then serves
``--requests`` requests twice: once timing the host's parts of each round trip and the device time of each window
(CUDA events), once under ``torch.profiler`` to list the kernels that take the GPU's time, and their time and
launches per iteration by kind (matrix products, attention, Inductor's generated kernels, copies).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch
from decode_throughput import MODELS, SHAPES, GpuBusy, Spec, build, generation_lengths

from mor import MoRConfig
from mor.infer.engine import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="135m", choices=sorted(SHAPES))
    parser.add_argument("--model", default="vanilla", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--mean-tokens", type=float, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=0,
                        help="random prompt tokens per request (default 0: each starts from one token)")
    parser.add_argument("--loop-prompt-tokens", type=int, default=256,
                        help="prompts of up to N tokens go through the decoding loop, longer ones are prefilled")
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--tail-slots", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-kernel", action="store_true")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--rows", type=int, default=25, help="rows of the kernel table")
    parser.add_argument("--trace", action="store_true",
                        help="also list one iteration's kernels in launch order, with the gap before each")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("profiling the engine needs a CUDA device")
    args.seed, args.calibration_rows = 0, 8
    config = MoRConfig.from_preset(SHAPES[args.shape], **MODELS[args.model])
    model, source = build(Spec(args.shape, args.model, config, "vanilla"), "cuda", torch.bfloat16, args)
    lengths = generation_lengths(args.requests, args.mean_tokens, args.mean_tokens / 8, 0)
    graphs = not args.no_cuda_graphs
    engine = Engine(model, max_batch_slots=args.batch, max_seq_len=1 + args.prompt_tokens + max(lengths),
                    cuda_graphs=graphs, compile=graphs and not args.no_compile, kernel=not args.no_kernel,
                    window=args.window,
                    tail_slots=args.tail_slots, loop_prompt_tokens=args.loop_prompt_tokens)
    generator = torch.Generator().manual_seed(0)
    prompts = [[model.config.bos_token_id or 0] + torch.randint(
        0, model.config.vocab_size, (args.prompt_tokens,), generator=generator).tolist() for _ in lengths]
    engine.generate(prompts[: args.batch], 16, do_sample=True, seed=0)

    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for owner, name in ((engine, "_admit"), (engine, "_prefill"), (engine, "_collect"), (engine.runner, "launch"),
                        (engine.runner, "collect")):
        original = getattr(owner, name)

        def timed(*a, _original=original, _name=name, **k):
            begin = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - begin
                calls[_name] += 1

        setattr(owner, name, timed)
    with GpuBusy(engine) as busy:
        out = engine.generate(prompts, lengths, do_sample=True, seed=0)
    s = out.stats
    print(f"{torch.cuda.get_device_name()}, PyTorch {torch.__version__}, command: profile_engine.py "
          f"{' '.join(sys.argv[1:])}")
    print(f"{args.shape} {args.model} B={args.batch} compile={engine.compiled} graphs={graphs} "
          f"kernel={engine.runner.kernel} tail slots={engine.runner.tail_slots} ({source})")
    print(f"{s.tokens} tokens in {s.seconds:.2f} s: {s.tokens_per_second:,.0f} tok/s, {s.iterations} iterations "
          f"({1e3 * s.seconds / max(s.iterations, 1):.3f} ms each) in {s.windows} windows, occupancy "
          f"{s.block_occupancy:.2f}, {s.mean_tail_batch:.1f} tokens sampled per iteration")
    print(f"GPU busy {busy.seconds:.2f} s of {s.seconds:.2f} s ({100 * busy.seconds / s.seconds:.0f}%)")
    print("host time (collect waits for the device):")
    for name in spent:
        print(f"  {name:<10} {calls[name]:>6} calls {1e3 * spent[name]:>9.1f} ms "
              f"({1e3 * spent[name] / max(calls[name], 1):.3f} ms/call)")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        iterations = engine.generate(prompts, lengths, do_sample=True, seed=0).stats.iterations
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=args.rows))
    print_kernel_summary(events, iterations)
    if args.trace:
        print_iteration_trace(engine)


KINDS = (("generated (fused)", ("triton_",)), ("matrix products", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
         ("attention", ("paged_decode", "flash", "fmha", "attention")), ("copies", ("memcpy", "memset")))


def kind_of(kernel: str) -> str:
    """A kernel's kind from its name; Inductor's generated kernels first (their names list the ops they fuse)."""
    name = kernel.lower()
    return next((kind for kind, marks in KINDS if any(mark in name for mark in marks)), "other")


def print_kernel_summary(events, iterations: int) -> None:
    """Kernel time and launches per iteration, by kind (every kernel, not only the table's rows)."""
    time: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kind = kind_of(event.key)
            time[kind] += event.self_device_time_total  # microseconds
            launches[kind] += event.count
    per = max(iterations, 1)
    print(f"kernels per iteration ({iterations} iterations): {sum(time.values()) / per:.1f} us in "
          f"{sum(launches.values()) / per:.1f} launches")
    for kind in sorted(time, key=time.get, reverse=True):
        print(f"  {kind:<16} {time[kind] / per:>8.1f} us {launches[kind] / per:>7.1f} launches")


def print_iteration_trace(engine: Engine) -> None:
    """One window of one iteration (replayed on idle rows: the same kernels, shorter attention), kernel by kernel
    in launch order, so that each kernel can be traced back to the code that launches it."""
    runner = engine.runner
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        runner.wait(runner.launch(1, "sample"))
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    print(f"one iteration, kernel by kernel ({len(kernels)} kernels):")
    print(f"  {'start us':>9} {'gap us':>7} {'time us':>8}  kernel")
    first, end = kernels[0].time_range.start, kernels[0].time_range.start
    for e in kernels:
        start = e.time_range.start
        print(f"  {start - first:>9.1f} {start - end:>7.1f} {e.time_range.elapsed_us():>8.1f}  {e.name[:110]}")
        end = e.time_range.end
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    print(f"  {busy:.1f} us of kernels in {end - first:.1f} us")


if __name__ == "__main__":
    main()
