"""Serving under load: ``mor serve`` against the engine's offline throughput on the same requests.

For each model the benchmark first serves the closed loop's requests offline (``Engine.generate``, every request
queued at once: the ceiling), then starts a real ``mor serve`` process on 127.0.0.1 with the same engine settings
and drives it with the official ``openai`` client, streaming:

- **Poisson arrivals** at each of ``--rates`` requests/s;
- a **closed loop** of ``--clients`` clients (default twice the batch), each sending its next request when the
  last one ends, over ``--closed-requests`` requests (default 8 per client, so that ramp-up and drain weigh
  little): the batch-saturating load, whose throughput is set against the offline one (``vs_offline``; the
  target is >= 0.9).

Requests come from a corpus: a paragraph of a document is the prompt (token ids, cut to ``--max-prompt``) and the
token count of the next paragraph is the output length (clipped to [16, ``--max-output``]). The default corpus is
the shared data's ``corpus/prose-val.jsonl.xz`` with the SmolLM2 tokenizer (``$MOR_DATA_DIR``, else
``shared/data`` beside the repository), else the bundled sample. Tokens are sampled at temperature 1 with a seed
per request. Each row reports throughput (generated tokens/s from the first request sent to the last token
received), time to first token and time per output token after the first (p50, p99, client-side), the mean
recursion depth and the server's own mean time to first token (from ``/metrics``).

Models: the 360M shape, vanilla and MoR-3/MoR-4 (expert-choice, middle-cycle), random weights with routers
calibrated so that a 1/Nr share of tokens exits at each depth (as ``decode_throughput.py``), or trained
checkpoints (``--checkpoint NAME=DIR``, served by ``mor serve DIR``).

    python benchmarks/serve_load.py --out bench-out           # one GPU, bf16, CUDA graphs
    python benchmarks/serve_load.py --device cpu --quick      # tiny shape, seconds (smoke test)

Results: docs/serving.md (measured on one H200).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_throughput import MODELS, SHAPES, calibrate_exits  # noqa: E402

from mor import MoRConfig, MoRForCausalLM  # noqa: E402
from mor.data.sample import sample_corpus_paths, sample_tokenizer_path  # noqa: E402
from mor.data.sources import iter_documents  # noqa: E402
from mor.data.tokenizer import TextTokenizer, load_tokenizer  # noqa: E402
from mor.infer.engine import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MIN_OUTPUT = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default 360m (CPU quick: tiny)")
    parser.add_argument("--models", default="vanilla,mor-3,mor-4", help=f"comma-separated of {', '.join(MODELS)}")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="serve a trained checkpoint for model NAME (mor serve DIR); repeatable")
    parser.add_argument("--batch", type=int, default=None, help="the server's --max-batch (default 128; CPU quick 4)")
    parser.add_argument("--requests", type=int, default=None, help="requests per load point (default 400)")
    parser.add_argument("--rates", default=None, help="Poisson arrival rates, requests/s (default 4,8,16,32,64)")
    parser.add_argument("--clients", type=int, default=None, help="closed-loop clients (default 2 x --batch)")
    parser.add_argument("--closed-requests", type=int, default=None,
                        help="requests of the closed loop and of the offline run it is compared with (default 8 x "
                             "--clients, so that ramp-up and drain are a small part of the run)")
    parser.add_argument("--client-processes", type=int, default=None,
                        help="processes the clients are spread over (default 4; CPU quick 1)")
    parser.add_argument("--max-prompt", type=int, default=None, help="prompt tokens at most (default 256)")
    parser.add_argument("--max-output", type=int, default=None, help="output tokens at most (default 256)")
    parser.add_argument("--corpus", type=Path, help="documents as `mor data prepare` reads them: JSON Lines with a "
                                                    "text field (.gz/.xz/.zst), text or Parquet (default: see above)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: see above)")
    parser.add_argument("--loop-prompt-tokens", type=int, default=256,
                        help="prompts of up to N tokens go through the decoding loop, longer ones are prefilled "
                             "(default 256, as mor serve; 0: prefill every prompt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a small subset")
    parser.add_argument("--out", default=os.environ.get("OUT") or "bench-out", help="directory for the JSON")
    parser.add_argument("--serve", metavar="NAME", help=argparse.SUPPRESS)  # internal: be the server for NAME
    args = parser.parse_args(argv)
    quick_cpu = args.quick and args.device == "cpu"
    defaults = dict(shape="tiny" if quick_cpu else "360m", batch=4 if quick_cpu else 128,
                    requests=12 if quick_cpu else 100 if args.quick else 400,
                    rates="8" if quick_cpu else "16" if args.quick else "4,8,16,32,64",
                    max_prompt=32 if quick_cpu else 256, max_output=24 if quick_cpu else 256,
                    client_processes=1 if quick_cpu else 4)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("client_processes", "closed_requests"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    args.clients = args.clients or 2 * args.batch
    args.closed_requests = args.closed_requests or (2 if quick_cpu else 8) * args.clients
    shared = Path(os.environ.get("MOR_DATA_DIR", ROOT.parent / "shared" / "data"))
    use_shared = (shared / "corpus" / "prose-val.jsonl.xz").is_file() and not quick_cpu
    args.corpus = args.corpus or (shared / "corpus" / "prose-val.jsonl.xz" if use_shared
                                  else sample_corpus_paths()["val"])
    args.tokenizer = args.tokenizer or (shared / "tokenizers" / "smollm2" / "tokenizer.json" if use_shared
                                        else sample_tokenizer_path())
    return args


# ---------------------------------------------------------------------------------------------- workload
def workload(args: argparse.Namespace, tokenizer: TextTokenizer) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) pairs: a paragraph, and the token count of the one after it."""
    pairs = []
    for text in iter_documents(args.corpus):
        paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        pairs += zip(paragraphs, paragraphs[1:])
    rng = np.random.default_rng(args.seed)
    count = max(args.requests, args.closed_requests)
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[:count]]
    encoded = tokenizer.encode_batch([p for pair in chosen for p in pair])
    out = []
    for prompt, following in zip(encoded[::2], encoded[1::2]):
        if prompt:
            out.append((prompt[: args.max_prompt], int(np.clip(len(following), MIN_OUTPUT, args.max_output))))
    if not out:
        raise ValueError(f"{args.corpus} has no paragraphs to make requests of")
    return [out[i % len(out)] for i in range(count)]


# ---------------------------------------------------------------------------------------------- models
def build(name: str, args: argparse.Namespace, vocab_size: int) -> MoRForCausalLM:
    """The model on the device in eval mode: a checkpoint, or random weights with calibrated exits."""
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    device = args.device
    if name in checkpoints:
        return MoRForCausalLM.from_pretrained(checkpoints[name], map_location=device).eval()
    preset = SHAPES[args.shape]
    vocab = max(MoRConfig.from_preset(preset).vocab_size, vocab_size)
    torch.manual_seed(args.seed)
    model = MoRForCausalLM(MoRConfig.from_preset(preset, **MODELS[name], vocab_size=vocab)).to(device).eval()
    if model.model.expert is not None:
        calibrate_exits(model, 8, min(512, model.config.max_position_embeddings), args.seed)
    return model


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if args.device.startswith("cuda") else torch.float32


def run_server(args: argparse.Namespace) -> None:
    """The --serve mode: the same model as the parent builds, served as ``mor serve`` serves a checkpoint."""
    from mor.serve.server import ServeOptions, listen, serve

    tokenizer = load_tokenizer(args.tokenizer)
    model = build(args.serve, args, tokenizer.vocab_size).to(dtype_of(args))
    options = ServeOptions(max_batch=args.batch, max_queue=max(args.requests, args.clients),
                           max_seq_len=args.max_prompt + args.max_output, cuda_graphs=args.device.startswith("cuda"),
                           loop_prompt_tokens=args.loop_prompt_tokens)
    serve(model, tokenizer, args.serve, listen("127.0.0.1", 0), options)


class Server:
    """A server process for model ``name`` on a free port of 127.0.0.1."""

    def __init__(self, name: str, args: argparse.Namespace, argv: list[str], log: Path) -> None:
        checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
        if name in checkpoints:
            command = [sys.executable, "-m", "mor.cli", "serve", checkpoints[name], "--port", "0", "--tokenizer",
                       str(args.tokenizer), "--max-batch", str(args.batch), "--max-queue",
                       str(max(args.requests, args.clients)), "--max-seq-len", str(args.max_prompt + args.max_output),
                       "--served-model-name", name, "--device", args.device, "--loop-prompt-tokens",
                       str(args.loop_prompt_tokens)]
        else:
            command = [sys.executable, __file__, *argv, "--serve", name]
        self.log = log
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 1800  # compilation and graph capture on a GPU take minutes
        while (match := re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server for {name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        self.url = f"http://127.0.0.1:{match.group(1)}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ---------------------------------------------------------------------------------------------- load
@dataclass
class Sample:
    start: float
    first: float | None
    end: float
    tokens: int
    depth_sum: int


async def one_request(client, name: str, prompt: list[int], max_tokens: int, seed: int) -> Sample:
    start = time.perf_counter()
    first, tokens, depth_sum = None, 0, 0
    stream = await client.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=1.0,
                                             seed=seed, stream=True, extra_body={"return_depths": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].token_ids:
            first = first or time.perf_counter()
            tokens += len(chunk.choices[0].token_ids)
            depth_sum += sum(chunk.choices[0].depths)
    return Sample(start, first, time.perf_counter(), tokens, depth_sum)


Shard = list[tuple[int, float, list[int], int]]  # (request index, arrival time, prompt, output length)


def drive(url: str, name: str, requests: list[tuple[list[int], int]], rate: float | None, clients: int,
          seed: int, processes: int = 1) -> list[Sample]:
    """Poisson arrivals at ``rate`` requests/s, or (``rate`` None) a closed loop of ``clients`` clients, from
    ``processes`` client processes (every ``processes``-th request each): one Python process of ``openai`` streaming
    clients tops out at a couple of hundred requests/s, below what the server takes."""
    busy = len(requests) if rate else min(len(requests), clients)  # more processes would have nothing to do
    processes = max(1, min(processes, busy))
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, len(requests))) if rate else \
        np.zeros(len(requests))
    shards: list[Shard] = [[(i, float(arrivals[i]), *requests[i]) for i in range(k, len(requests), processes)]
                           for k in range(processes)]
    loops = [clients // processes + (k < clients % processes) for k in range(processes)]
    if processes == 1:
        return asyncio.run(_drive_shard(url, name, shards[0], rate is not None, loops[0], seed, time.perf_counter))
    context = multiprocessing.get_context("spawn")  # the parent may hold a CUDA context, which fork cannot share
    ready, go, begin = context.Barrier(processes + 1), context.Barrier(processes + 1), context.Value("d", 0.0)
    with ProcessPoolExecutor(processes, context, _client_start, (ready, go, begin)) as pool:
        pending = [pool.submit(_client_process, url, name, shard, rate is not None, n, seed)
                   for shard, n in zip(shards, loops)]
        ready.wait(timeout=START_TIMEOUT)  # every process has its client and waits for the start
        begin.value = time.perf_counter() + 0.05  # CLOCK_MONOTONIC: one clock for every process
        go.wait(timeout=START_TIMEOUT)
        return [sample for job in pending for sample in job.result()]


START_TIMEOUT = 300  # seconds a client process may take to start
_start: tuple = ()  # a client process's start barriers and start time, from the parent


def _client_start(ready, go, begin) -> None:
    global _start
    _start = (ready, go, begin)


def _client_process(url: str, name: str, shard: Shard, poisson: bool, loops: int, seed: int) -> list[Sample]:
    ready, go, begin = _start

    def start() -> float:
        ready.wait(timeout=START_TIMEOUT)
        go.wait(timeout=START_TIMEOUT)
        return begin.value

    try:
        return asyncio.run(_drive_shard(url, name, shard, poisson, loops, seed, start))
    except BaseException:  # the client's own exceptions do not survive the trip back to the parent
        raise RuntimeError(f"a client process failed:\n{traceback.format_exc()}") from None


async def _drive_shard(url: str, name: str, shard: Shard, poisson: bool, loops: int, seed: int,
                       start: Callable[[], float]) -> list[Sample]:
    """Drive ``shard`` once ``start`` (blocking) returns the start time."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    try:
        begin = start()
        await asyncio.sleep(max(0.0, begin - time.perf_counter()))
        if poisson:
            async def arrive(i: int, at: float, prompt: list[int], n: int) -> Sample:
                await asyncio.sleep(max(0.0, begin + at - time.perf_counter()))
                return await one_request(client, name, prompt, n, seed + i)

            return list(await asyncio.gather(*(arrive(*item) for item in shard)))
        queue = list(shard)
        samples: list[Sample] = []

        async def loop() -> None:
            while queue:
                i, _, prompt, n = queue.pop(0)
                samples.append(await one_request(client, name, prompt, n, seed + i))

        await asyncio.gather(*(loop() for _ in range(loops)))
        return samples
    finally:
        await client.close()


def summarise(samples: list[Sample]) -> dict:
    tokens = sum(s.tokens for s in samples)
    seconds = max(s.end for s in samples) - min(s.start for s in samples)
    ttft = [s.first - s.start for s in samples if s.first is not None]
    tpot = [(s.end - s.first) / (s.tokens - 1) for s in samples if s.first is not None and s.tokens > 1]
    return dict(requests=len(samples), tokens=tokens, seconds=seconds, tokens_per_second=tokens / seconds,
                requests_per_second=len(samples) / seconds, mean_depth=sum(s.depth_sum for s in samples) / tokens,
                ttft_p50=float(np.percentile(ttft, 50)), ttft_p99=float(np.percentile(ttft, 99)),
                tpot_p50=float(np.percentile(tpot, 50)), tpot_p99=float(np.percentile(tpot, 99)))


def server_ttft(url: str) -> tuple[float, float]:
    """The server's own time-to-first-token sum and count so far (from /metrics)."""
    from urllib.request import urlopen

    from mor.serve.metrics import parse

    samples = parse(urlopen(url + "/metrics").read().decode())
    return samples["mor_time_to_first_token_seconds_sum"], samples["mor_time_to_first_token_seconds_count"]


# ---------------------------------------------------------------------------------------------- main
def offline(model: MoRForCausalLM, requests: list[tuple[list[int], int]], args: argparse.Namespace) -> dict:
    """The engine alone on the whole workload, with the server's settings."""
    engine = Engine(model, max_batch_slots=args.batch, max_seq_len=args.max_prompt + args.max_output,
                    cuda_graphs=args.device.startswith("cuda"), loop_prompt_tokens=args.loop_prompt_tokens)
    prompts, lengths = [p for p, _ in requests], [n for _, n in requests]
    engine.generate(prompts[: args.batch], lengths[: args.batch], do_sample=True, seed=args.seed)  # warm-up
    stats = engine.generate(prompts, lengths, do_sample=True, seed=args.seed).stats
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return dict(tokens=stats.tokens, seconds=stats.seconds, tokens_per_second=stats.tokens_per_second,
                mean_depth=sum(d * n for d, n in stats.depth_histogram.items()) / max(stats.tokens, 1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.serve:
        run_server(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer)
    requests = workload(args, tokenizer)
    meta = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
                torch=torch.__version__, shape=args.shape, batch=args.batch, clients=args.clients,
                client_processes=args.client_processes,
                requests=args.requests, closed_requests=args.closed_requests, corpus=str(args.corpus),
                tokenizer=str(args.tokenizer),
                mean_prompt=float(np.mean([len(p) for p, _ in requests])),
                mean_output=float(np.mean([n for _, n in requests])), command=" ".join(sys.argv))
    results: list[dict] = []
    print(f"{'model':<10} {'load':<14} {'tok/s':>9} {'req/s':>7} {'vs off':>7} {'TTFT p50':>9} {'p99':>8} "
          f"{'TPOT p50':>9} {'p99':>8} {'depth':>6}")
    for name in args.models.split(","):
        torch.compiler.reset()
        model = build(name, args, tokenizer.vocab_size).to(dtype_of(args))
        closed = requests[: args.closed_requests]
        base = offline(model, closed, args)
        del model
        row = dict(model=name, load="offline", **base)
        results.append(row)
        print(f"{name:<10} {'offline':<14} {base['tokens_per_second']:>9.1f} {'':>7} {'1.00':>7} {'':>9} {'':>8} "
              f"{'':>9} {'':>8} {base['mean_depth']:>6.2f}", flush=True)
        server = Server(name, args, argv, out / f"server-{name}.log")
        try:
            # Warm-up, at once: the server listens before its start-up line names the port, so no connection is
            # refused while uvicorn starts.
            drive(server.url, name, requests[: args.batch], None, args.batch, args.seed, args.client_processes)
            loads = [(f"poisson {rate:g}/s", float(rate)) for rate in map(float, args.rates.split(","))]
            for label, rate in [*loads, (f"closed {args.clients}", None)]:
                before = server_ttft(server.url)
                work = requests[: args.requests] if rate else closed
                stats = summarise(drive(server.url, name, work, rate, args.clients, args.seed,
                                        args.client_processes))
                after = server_ttft(server.url)
                row = dict(model=name, load=label, rate=rate, **stats,
                           server_ttft_mean=(after[0] - before[0]) / max(after[1] - before[1], 1),
                           vs_offline=stats["tokens_per_second"] / base["tokens_per_second"])
                results.append(row)
                print(f"{name:<10} {label:<14} {row['tokens_per_second']:>9.1f} {row['requests_per_second']:>7.2f} "
                      f"{row['vs_offline']:>7.2f} {row['ttft_p50']:>9.3f} {row['ttft_p99']:>8.3f} "
                      f"{row['tpot_p50']:>9.4f} {row['tpot_p99']:>8.4f} {row['mean_depth']:>6.2f}", flush=True)
                (out / "serve_load.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
