"""Training-step throughput and peak memory: vanilla, recursive and MoR against Hugging Face Llama.

Forward + backward of one micro-batch (default 16 x 2048 tokens) in bf16 autocast with ``torch.compile``, for
the 135M and 360M shapes of the paper. ``transformers.LlamaForCausalLM`` (SDPA, compiled) on the same shape is
measured in the same run as the baseline. Prints a table and writes JSON.

    python benchmarks/train_step.py --shapes smollm-135m smollm-360m --out bench-out
    python benchmarks/train_step.py --shapes smollm-360m --models vanilla mor-expert-3 --regional --chunked-loss

``--regional`` compiles our models a layer at a time (``MoRForCausalLM.compile_regions``) and ``--chunked-loss``
takes their head and loss a chunk of tokens at a time; ``first_step_s`` in the JSON is the first step, compile
included.

MFU counts 3x the forward FLOPs of ``mor.model.flops`` (linear layers, causal attention) plus the LM head, against
the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from mor import MoRConfig, MoRForCausalLM
from mor.model.flops import forward_flops_per_token

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

MODELS: dict[str, dict] = {
    "vanilla": {},
    "recursive-3": dict(sharing="middle_cycle", num_recursions=3),
    "mor-expert-2": dict(sharing="middle_cycle", num_recursions=2, router="expert"),
    "mor-expert-3": dict(sharing="middle_cycle", num_recursions=3, router="expert"),
    "mor-expert-4": dict(sharing="middle_cycle", num_recursions=4, router="expert"),
    "mor-token-3": dict(sharing="middle_cycle", num_recursions=3, router="token"),
    "mor-expert-3-kvshare": dict(sharing="middle_cycle", num_recursions=3, router="expert", kv_cache="share"),
}


def model_overrides(name: str) -> dict:
    """Overrides of a named model; ``vanilla-<N>L`` is a vanilla model of N layers (same depth as a MoR)."""
    if name.startswith("vanilla-") and name.endswith("L"):
        return dict(num_hidden_layers=int(name[len("vanilla-"):-1]))
    return MODELS[name]


def peak_flops() -> float | None:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def time_steps(step, warmup: int, iters: int) -> float:
    """Median seconds per call of ``step`` (CUDA events)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def measure(model: torch.nn.Module, ids: torch.Tensor, compile_model: bool, warmup: int, iters: int,
            chunked_loss: bool = False, regional: bool = False) -> dict:
    model.train()
    fn = model
    ours = isinstance(model, MoRForCausalLM)
    if compile_model and ours and regional:
        model.compile_regions()
    elif compile_model and ours:
        model.compile()  # one graph for token-choice too (MoRForCausalLM.compile)
    elif compile_model:
        fn = torch.compile(model)
    kwargs = dict(return_logits=False) if ours and chunked_loss else {}

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(ids, labels=ids, **kwargs).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None

    torch.cuda.reset_peak_memory_stats()
    compile_start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - compile_start
    seconds = time_steps(step, warmup, iters)
    return {
        "seconds_per_step": seconds,
        "tokens_per_s": ids.numel() / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_step_s": compile_s,
    }


def hf_llama(config: MoRConfig) -> torch.nn.Module:
    import transformers

    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=True,
        attn_implementation="sdpa", use_cache=False,
    )
    return transformers.LlamaForCausalLM(hf_config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["smollm-135m", "smollm-360m"])
    parser.add_argument("--models", nargs="+", default=["hf-llama", *MODELS])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--regional", action="store_true",
                        help="compile our models a layer at a time (run.compile: regional)")
    parser.add_argument("--chunked-loss", action="store_true",
                        help="our models take the head and loss a chunk at a time (run.chunked_loss)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    peak = peak_flops()
    records: list[dict] = []
    for shape in args.shapes:
        for name in args.models:
            base = MoRConfig.from_preset(shape)
            config = base if name == "hf-llama" else MoRConfig.from_preset(shape, **model_overrides(name))
            record = {"shape": shape, "model": name, "batch_size": args.batch_size, "seq_len": args.seq_len,
                      "effective_layers": config.num_effective_layers, "device": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "command": "train_step.py " + " ".join(sys.argv[1:]),
                      "compiled": not args.no_compile,
                      "chunked_loss": args.chunked_loss and name != "hf-llama",
                      "regional": args.regional and name != "hf-llama"}
            try:
                torch.manual_seed(0)
                model = (hf_llama(base) if name == "hf-llama" else MoRForCausalLM(config)).cuda()
                ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device="cuda")
                record.update(measure(model, ids, not args.no_compile, args.warmup, args.iters, args.chunked_loss,
                                       args.regional))
                head = 2.0 * config.hidden_size * config.vocab_size
                record["train_flops_per_token"] = 3.0 * (forward_flops_per_token(config, args.seq_len) + head)
                if peak:
                    record["mfu"] = record["train_flops_per_token"] * record["tokens_per_s"] / peak
            except Exception as error:  # keep the other measurements
                record["error"] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
            finally:
                model = None
                torch.cuda.empty_cache()
                torch._dynamo.reset()
            records.append(record)
            (out_dir / "train_step.json").write_text(json.dumps(records, indent=2))
            print(json.dumps(record), flush=True)

    print(f"\n{'shape':<12} {'model':<22} {'tok/s':>10} {'vs HF':>6} {'vs vanilla same depth':>22} {'mem GiB':>8} {'MFU':>6}")
    for shape in args.shapes:
        rows = [r for r in records if r["shape"] == shape]
        ref = {r["model"]: r.get("tokens_per_s") for r in rows}
        for r in rows:
            if "error" in r:
                print(f"{shape:<12} {r['model']:<22} {'error: ' + r['error'][:60]}")
                continue
            tps = r["tokens_per_s"]
            vs_hf = f"{tps / ref['hf-llama']:.2f}" if ref.get("hf-llama") else "-"
            same_depth = [m for m, x in ref.items() if x and m.startswith("vanilla")
                          and next(q for q in rows if q["model"] == m)["effective_layers"] == r["effective_layers"]]
            vs_van = f"{tps / ref[same_depth[0]]:.2f}" if same_depth else "-"
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            print(f"{shape:<12} {r['model']:<22} {tps:>10,.0f} {vs_hf:>6} {vs_van:>22} {r['peak_memory_gib']:>8.1f} {mfu:>6}")


if __name__ == "__main__":
    main()
