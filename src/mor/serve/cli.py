"""``mor serve``: an OpenAI-compatible HTTP server on the continuous depth-wise batching engine."""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from mor.cli import add_device_argument, positive_int, resolve_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a playground page",
        description="Serve CHECKPOINT over HTTP: POST /v1/completions and /v1/chat/completions (streaming or not), "
                    "GET /v1/models, /health, /metrics (Prometheus), and a playground at / that colours each token "
                    "by its recursion depth. Concurrent requests share the depth-wise batching engine. SIGTERM "
                    "stops accepting, lets the requests in flight finish within --drain-timeout, then exits. "
                    "Needs 'mor[serve]'.")
    parser.add_argument("checkpoint", help="a mor checkpoint folder (save_pretrained, training, mor convert), a "
                                           "Hugging Face Llama folder, or a .gguf file")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                                                            "machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, metavar="N", help="port to listen on (default 8000)")
    parser.add_argument("--max-batch", type=positive_int, default=32, metavar="N",
                        help="requests decoded together at most: the engine's rows and block slots (default 32)")
    parser.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="requests that may wait for a row; more are answered 429 with Retry-After (default 256)")
    parser.add_argument("--max-seq-len", type=positive_int, metavar="N",
                        help="prompt + generated tokens per request at most (default: the model's context); the KV "
                             "page pool holds --max-batch requests of this length")
    parser.add_argument("--extra-recursions", type=int, default=0, metavar="N",
                        help="the most test-time recursions a request may ask for with extra_recursions (default 0)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model name clients send (default: the checkpoint's folder or file name)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="tokenizer.json or a folder holding one (and tokenizer_config.json with a chat "
                             "template); default: the checkpoint's")
    parser.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="seconds the requests in flight get to finish after SIGTERM (default 30)")
    parser.add_argument("--eager", action="store_true",
                        help="on CUDA, skip CUDA graphs and compilation: starts at once, decodes slower")
    add_device_argument(parser)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="auto = bfloat16 on CUDA, float32 on CPU")
    parser.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    missing = [name for name in ("starlette", "uvicorn", "pydantic", "jinja2") if not importlib.util.find_spec(name)]
    if missing:
        raise ModuleNotFoundError(f"mor serve needs {', '.join(missing)}: pip install 'mor[serve]'")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    listener = listen(args.host, args.port)  # before loading: a port in use fails at once
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.checkpoint, args.tokenizer, device, args.dtype)
    path = Path(args.checkpoint)
    name = args.served_model_name or (path.stem if path.is_file() else path.resolve().name)
    serve(model, tokenizer, name, listener, args, cuda_graphs=device.startswith("cuda") and not args.eager)
    return 0


def serve(model: Any, tokenizer: Any, name: str, listener: socket.socket, args: argparse.Namespace,
          cuda_graphs: bool) -> None:
    """Serve ``model`` (a ``MoRForCausalLM``) and ``tokenizer`` (a ``TextTokenizer``) on ``listener`` with the
    options of ``mor serve`` in ``args`` until SIGTERM or Ctrl-C."""
    import uvicorn

    from mor.infer.engine import Engine
    from mor.serve.app import ServedModel, build_app
    from mor.serve.chat import end_of_turn_token, load_chat_template
    from mor.serve.metrics import Metrics
    from mor.serve.worker import EngineWorker

    folder = tokenizer.path.parent
    end_tokens = {tokenizer.eos_token_id}
    turn_end = end_of_turn_token(folder)
    if turn_end is not None and tokenizer.backend.token_to_id(turn_end) is not None:
        end_tokens.add(tokenizer.backend.token_to_id(turn_end))
    engine = Engine(model, max_batch_slots=args.max_batch, max_seq_len=args.max_seq_len,
                    extra_recursions=args.extra_recursions, cuda_graphs=cuda_graphs)
    metrics = Metrics(engine.cache.pool.num_pages)
    worker = EngineWorker(engine, sorted(end_tokens), args.max_queue, metrics)
    served = ServedModel(name, tokenizer, load_chat_template(folder), end_tokens)
    app = build_app(served, worker, metrics)
    worker.start()  # prepares the engine: compiles and captures CUDA graphs on a GPU
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=args.drain_timeout)
    print(f"mor serve: {name} on http://{args.host}:{listener.getsockname()[1]} (playground at /, "
          f"{engine.max_requests} rows, context {engine.max_seq_len}, "
          f"{'a chat template' if served.chat_template else 'no chat template'})", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: make that one return, so
    # that a drained server exits with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        worker.stop()


def load_model(path: str, tokenizer: str | None, device: str, dtype: str) -> tuple[Any, Any]:
    """A mor checkpoint through ``load_checkpoint``; a Hugging Face Llama folder or a ``.gguf`` file through the
    Llama import, with the tokenizer beside it (or ``tokenizer``)."""
    from mor.data.tokenizer import load_tokenizer
    from mor.eval.checkpoint import load_checkpoint, resolve_dtype

    source = Path(path)
    config = source / "config.json"
    if source.is_dir() and config.is_file() and json.loads(config.read_text()).get("model_type") == "mor":
        return load_checkpoint(source, tokenizer, device, dtype)
    if not source.exists():
        raise FileNotFoundError(f"checkpoint {source} does not exist; give a mor checkpoint folder, a Hugging Face "
                                "Llama folder or a .gguf file")
    from mor.interop.llama import load_hf_llama

    folder = source if source.is_dir() else source.parent
    if tokenizer is None and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} holds no tokenizer.json; pass the model's tokenizer with --tokenizer PATH")
    text_tokenizer = load_tokenizer(tokenizer or folder)
    model = load_hf_llama(source, resolve_dtype(dtype, device)).to(device)
    if text_tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {text_tokenizer.path} has {text_tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary holds {model.config.vocab_size}; pass the tokenizer it was trained with")
    return model, text_tokenizer


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one), or a one-line error naming the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host") \
            from None
    return listener
