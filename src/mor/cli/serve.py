"""``mor serve``: an OpenAI-compatible HTTP server on the continuous depth-wise batching engine."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from mor.cli.common import add_checkpoint_arguments, non_negative_int, positive_int

SERVE_PACKAGES = ("starlette", "uvicorn", "pydantic", "jinja2")  # the serve extra


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a playground page",
        description="Serve CHECKPOINT over HTTP: POST /v1/completions and /v1/chat/completions (streaming or not), "
                    "GET /v1/models, /health, /metrics (Prometheus), and a playground at / that colours each token "
                    "by its recursion depth. Concurrent requests share the depth-wise batching engine. SIGTERM "
                    "stops accepting, lets the requests in flight finish within --drain-timeout, then exits. "
                    "Needs 'mor[serve]'.")
    add_checkpoint_arguments(parser, "a mor checkpoint folder (save_pretrained, training, mor convert), a Hugging "
                                     "Face Llama folder, or a .gguf file (with --tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                                                            "machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=non_negative_int, default=8000, metavar="N",
                        help="port to listen on (default 8000; 0: a free one, named in the start-up line)")
    parser.add_argument("--max-batch", type=positive_int, default=32, metavar="N",
                        help="requests decoded together at most: the engine's rows and block slots (default 32)")
    parser.add_argument("--max-queue", type=non_negative_int, default=256, metavar="N",
                        help="requests that may wait for a row; more are answered 429 with Retry-After (default 256)")
    parser.add_argument("--max-seq-len", type=positive_int, metavar="N",
                        help="prompt + generated tokens per request at most (default: the model's context); the KV "
                             "page pool holds --max-batch requests of this length")
    parser.add_argument("--extra-recursions", type=non_negative_int, default=0, metavar="N",
                        help="the most test-time recursions a request may ask for with extra_recursions (default 0)")
    parser.add_argument("--loop-prompt-tokens", type=non_negative_int, default=256, metavar="N",
                        help="prompts of up to N tokens go through the decoding loop, a token per pass, with no "
                             "pause of the batch; longer ones are prefilled in one forward (default 256; 0: prefill "
                             "every prompt)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name clients send (default: the checkpoint's folder or file name)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="seconds the requests in flight get to finish after SIGTERM (default 30)")
    parser.add_argument("--eager", action="store_true",
                        help="on CUDA, skip CUDA graphs and compilation: starts at once, decodes slower")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    missing = [name for name in SERVE_PACKAGES if not importlib.util.find_spec(name)]
    if missing:
        raise ModuleNotFoundError(f"mor serve needs {', '.join(missing)}: pip install 'mor[serve]'")
    from mor.pretrained import resolve_device
    from mor.serve.server import ServeOptions, listen, load_served_model, serve

    # Closed however this ends (uvicorn closes it too on a clean stop): a failed load frees the port at once.
    with listen(args.host, args.port) as listener:
        device = resolve_device(args.device)
        model, tokenizer = load_served_model(args.checkpoint, args.tokenizer, device, args.dtype, args.verify)
        path = Path(args.checkpoint)
        name = args.served_model_name or (path.stem if path.is_file() else path.resolve().name)
        options = ServeOptions(args.host, args.max_batch, args.max_queue, args.max_seq_len, args.extra_recursions,
                               args.drain_timeout, cuda_graphs=device.startswith("cuda") and not args.eager,
                               loop_prompt_tokens=args.loop_prompt_tokens)
        serve(model, tokenizer, name, listener, options)
    return 0
