"""What the tests share: tiny models of every variant and token ids for them, a tiny text corpus with its
tokenizers and training configs, a language model with known logits, and a ``mor serve`` process to talk to."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from mor import MoRConfig, MoRForCausalLM
from mor.data import prepare, train_tokenizer
from mor.infer.kernel_support import kernel_available
from mor.train import TrainConfig, config_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"

# The Triton kernels run on a GPU, or on the CPU under TRITON_INTERPRET=1 (test_kernels_interpreted.py does that)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not kernel_available(torch.device(KERNEL_DEVICE)),
                                   reason="needs a CUDA device with Triton, or TRITON_INTERPRET=1 with Triton")


def shared_data_dir() -> Path:
    """The shared corpus/tokenizer/eval folder: $MOR_DATA_DIR, else ``shared/data`` beside the repository."""
    return Path(os.environ.get("MOR_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


# ---------------------------------------------------------------------------------------------- models
VOCAB = 256  # the tiny preset's vocabulary
_ROUTED = dict(sharing="middle_cycle", num_recursions=3)
# Every variant of the model on the tiny preset: vanilla, each sharing strategy with either KV cache, and the routers.
VARIANTS: dict[str, dict[str, Any]] = {
    "vanilla": {},
    **{f"recursive_{s}{'_share' if kv == 'share' else ''}": dict(sharing=s, num_recursions=2, kv_cache=kv)
       for s in ("cycle", "sequence", "middle_cycle", "middle_sequence") for kv in ("recursion", "share")},
    **{f"expert{'_share' if kv == 'share' else ''}": dict(_ROUTED, router="expert", kv_cache=kv)
       for kv in ("recursion", "share")},
    **{f"expert_aux_router{'_share' if kv == 'share' else ''}": dict(_ROUTED, router="expert", kv_cache=kv,
                                                                     expert_sampling="aux_router")
       for kv in ("recursion", "share")},
    "expert_cycle_mlp": dict(sharing="cycle", num_recursions=2, router="expert", router_arch="mlp"),
    **{f"token{'_share' if kv == 'share' else ''}": dict(_ROUTED, router="token", kv_cache=kv)
       for kv in ("recursion", "share")},
}
ROUTED_VARIANTS = sorted(name for name, fields in VARIANTS.items() if "router" in fields)


def make(variant: str = "vanilla", seed: int = 0, **overrides: Any) -> MoRForCausalLM:
    """A tiny model of ``VARIANTS[variant]`` with ``overrides``, initialised from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return MoRForCausalLM(MoRConfig.from_preset("tiny", **{**VARIANTS[variant], **overrides})).eval()


def scale_routers(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    """Multiply every router weight by ``factor``: decisive routers, whose scores lie far from the causal
    threshold, so that tokens really exit at different depths."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router" in name:
                param.mul_(factor)
    return model


def make_decisive(variant: str, seed: int = 0, **overrides: Any) -> MoRForCausalLM:
    """A tiny model for decoding tests: decisive routers, and a wider initialisation that gives varied greedy
    tokens (a tiny random model otherwise repeats one token)."""
    return scale_routers(make(variant, seed, initializer_range=0.2, **overrides), 10)


def uneven_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Norm gains drawn from [0.5, 1.5]: a dropped, misplaced or mixed-up layer then shows in the logits."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def tokens(batch: int = 2, length: int = 24, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """Random token ids [batch, length], never 0 (the tiny preset's end-of-text and padding token)."""
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- text and training
TEXT_VOCAB = 300  # the tokenizers trained on WORDS
WORDS = ("the river runs past an old mill while seven quick foxes jump over lazy dogs and a king counts "
         "his gold in the tower as rain falls on green hills near the quiet sea").split()


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(count)]


def bpe_tokenizer(folder: Path) -> Path:
    """A 300-token byte-level BPE trained on random sentences; returns the tokenizer.json path."""
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences(200)))
    return train_tokenizer([corpus], TEXT_VOCAB, folder / "tokenizer.json", progress=False).path


def word_tokenizer(size: int = 100) -> Tokenizer:
    """Whitespace-separated words ``w1 .. w{size-1}`` with ids 1.. and ``<|endoftext|>`` = 0."""
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def make_dataset(root: Path) -> Path:
    """A few hundred random documents, a 300-token BPE and token shards with a validation split."""
    rng = random.Random(0)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w") as handle:
        for _ in range(400):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
            handle.write(json.dumps({"text": text}) + "\n")
    tokenizer = train_tokenizer([corpus], TEXT_VOCAB, root / "tokenizer.json", progress=False)
    prepare([corpus], tokenizer, root / "data", val_fraction=0.1, progress=False)
    return root / "data"


def tiny_config(data_path: Path, out_dir: Path, **sections: dict[str, Any]) -> TrainConfig:
    """A tiny expert-choice MoR run of a few steps on CPU; ``sections`` update the defaults per section."""
    config: dict[str, Any] = {
        "model": {"preset": "tiny", "vocab_size": TEXT_VOCAB, "sharing": "middle_cycle", "num_recursions": 2,
                  "router": "expert"},
        "data": {"path": str(data_path), "seq_len": 32},
        "optim": {"lr": 3e-3},
        "schedule": {"kind": "wsd", "warmup": 2},
        "budget": {"steps": 6},
        "batch": {"micro_batch_size": 4},
        "run": {"out_dir": str(out_dir), "log_every": 1, "eval_every": 0, "eval_batches": 2, "save_every": 0,
                "progress": False, "device": "cpu"},  # fp32 on CPU: the exact-equality tests hold on any machine
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config_from_dict(config)


class CountingLM(torch.nn.Module):
    """A language model with known logits: after token ``t`` it puts ``margin`` on ``t + 1`` and 0 elsewhere,
    so ``log P(t + 1 | ..., t) = margin - log(e^margin + V - 1)`` and every other token gets ``-log(e^margin + V - 1)``.
    """

    def __init__(self, vocab_size: int = 100, margin: float = 5.0, max_position_embeddings: int = 64) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                                      eos_token_id=0, pad_token_id=0, router="none")
        self.margin = margin
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device
        self.calls: list[dict] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        self.calls.append({"shape": tuple(input_ids.shape), "attention_mask": attention_mask, **kwargs})
        nxt = (input_ids + 1) % self.config.vocab_size
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size) + self.anchor
        return SimpleNamespace(logits=logits.scatter(-1, nxt[..., None], self.margin))

    def logprob(self, hit: bool) -> float:
        log_z = torch.logsumexp(torch.tensor([self.margin] + [0.0] * (self.config.vocab_size - 1)), 0).item()
        return (self.margin if hit else 0.0) - log_z


# ---------------------------------------------------------------------------------------------- a server
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
END_TOKENS = [0, 2]  # the end of a document and of a chat turn (tokenizer_config's eos_token)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONTEXT = 256  # the tiny preset's


def byte_tokenizer() -> Tokenizer:
    """Byte-level, one token per byte ("é" is two), after the special tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {**{t: i for i, t in enumerate(SPECIALS)}, **{c: i + len(SPECIALS) for i, c in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def write_checkpoint(folder: Path, chat_template: bool = True) -> MoRForCausalLM:
    """A tiny expert-choice MoR (decisive routers, so depths vary) with the byte-level tokenizer."""
    model = make_decisive("expert", vocab_size=320)
    model.save_pretrained(folder)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    if chat_template:
        config_file = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config_file))
    return model


def render_chat(messages: list[dict[str, str]]) -> str:
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


class ServerProcess:
    """``mor serve CHECKPOINT --port 0 ...`` in a child process, its output in ``log``; ready once /health is."""

    def __init__(self, checkpoint: Path, log: Path, *options: str, timeout: float = 120) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(log, "w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "mor.cli", "serve", str(checkpoint), "--port", "0",
                                             "--device", "cpu", *options], stdout=out, stderr=subprocess.STDOUT,
                                            env=env)
        deadline = time.monotonic() + timeout
        while (match := re.search(r"on http://127\.0\.0\.1:(\d+)", log.read_text())) is None:
            self._check_alive(deadline)
            time.sleep(0.1)
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        while True:
            self._check_alive(deadline)
            try:
                if self.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)

    def _check_alive(self, deadline: float) -> None:
        if self.process.poll() is not None or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"mor serve did not start:\n{self.log.read_text()}")

    def request(self, method: str, path: str, body: bytes | str | dict[str, Any] | None = None,
                timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and body of one request on a fresh connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            connection.close()

    def metrics(self) -> dict[str, float]:
        from mor.serve.metrics import parse

        return parse(self.request("GET", "/metrics")[2].decode())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def open_stream(port: int, body: dict[str, Any], path: str = "/v1/completions") -> tuple[
        http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streaming request whose response is read event by event with :func:`events`."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", path, body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json"})
    return connection, connection.getresponse()


def events(response: http.client.HTTPResponse):
    """The JSON bodies of a server-sent event stream, until ``[DONE]``."""
    for line in response:
        line = line.strip()
        if not line:
            continue
        assert line.startswith(b"data: "), line
        if line == b"data: [DONE]":
            return
        yield json.loads(line[len(b"data: "):])


def wait_for(condition, timeout: float = 20, interval: float = 0.05):
    """Poll ``condition()`` until it returns something true; that value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
    return value
