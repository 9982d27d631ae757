"""Running the server: load what to serve, bind the port, build the engine, its worker and the application, and run
uvicorn until SIGTERM (``mor serve`` parses its options into :class:`ServeOptions` and calls :func:`serve`)."""

from __future__ import annotations

import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from mor.data.tokenizer import TextTokenizer
from mor.model import MoRForCausalLM


@dataclass(frozen=True)
class ServeOptions:
    """``max_batch``: the engine's rows and block slots; ``max_queue``: requests that may wait for a row beyond
    them; ``max_seq_len``: prompt + generated tokens per request (None: the model's context); ``extra_recursions``:
    the most test-time recursions a request may ask for; ``drain_timeout``: seconds the requests in flight get after
    SIGTERM; ``cuda_graphs``: capture the engine's windows (and compile) on CUDA; ``loop_prompt_tokens``: prompts
    of up to this many tokens go through the decoding loop instead of a prefill (``Engine``)."""

    host: str = "127.0.0.1"
    max_batch: int = 32
    max_queue: int = 256
    max_seq_len: int | None = None
    extra_recursions: int = 0
    drain_timeout: float = 30.0
    cuda_graphs: bool = False
    loop_prompt_tokens: int = 256


def load_served_model(path: str | Path, tokenizer: str | Path | None, device: str, dtype: str,
                      verify: bool = True) -> tuple[MoRForCausalLM, TextTokenizer]:
    """A mor checkpoint folder, or a Hugging Face Llama folder or a ``.gguf`` file through the Llama import (a
    vanilla mor model with the same logits), with the tokenizer beside it or ``tokenizer``: what
    :func:`mor.pretrained.load_model_and_tokenizer` loads with ``llama=True``."""
    from mor.pretrained import load_model_and_tokenizer

    model, text_tokenizer = load_model_and_tokenizer(path, tokenizer, device, dtype, verify=verify, llama=True)
    assert isinstance(model, MoRForCausalLM)
    return model, text_tokenizer


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port`` (port 0: a free one), or a one-line error naming the fix. It listens
    before the model loads, so that a port in use fails at once, and a client that connects as soon as the
    start-up line names the port waits in the backlog until the server accepts it, rather than being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen()
    except OSError as error:
        listener.close()
        raise ValueError(f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host") \
            from None
    return listener


def serve(model: MoRForCausalLM, tokenizer: TextTokenizer, name: str, listener: socket.socket,
          options: ServeOptions) -> None:
    """Serve ``model`` as ``name`` on ``listener`` until SIGTERM (drains, then returns) or Ctrl-C."""
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
    engine = Engine(model, max_batch_slots=options.max_batch, max_seq_len=options.max_seq_len,
                    extra_recursions=options.extra_recursions, cuda_graphs=options.cuda_graphs,
                    loop_prompt_tokens=options.loop_prompt_tokens)
    metrics = Metrics(engine.cache.pool.num_pages)
    worker = EngineWorker(engine, sorted(end_tokens), options.max_queue, metrics)
    served = ServedModel(name, tokenizer, load_chat_template(folder), end_tokens)
    app = build_app(served, worker, metrics)
    worker.start()  # prepares the engine: compiles and captures CUDA graphs on a GPU
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=options.drain_timeout)
    print(f"mor serve: {name} on http://{options.host}:{listener.getsockname()[1]} (playground at /, "
          f"{engine.max_requests} rows, context {engine.max_seq_len}, "
          f"{'a chat template' if served.chat_template else 'no chat template'})", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: make that one return, so
    # that a drained server exits with status 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        worker.stop()
