"""A tiny checkpoint with a chat template and a real ``mor serve`` process on 127.0.0.1, for the server's tests."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mor import MoRConfig, MoRForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
END_TOKENS = [0, 2]  # the end of a document and of a chat turn (tokenizer_config's eos_token)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONTEXT = 256  # the tiny preset's


def write_checkpoint(folder: Path, chat_template: bool = True) -> MoRForCausalLM:
    """A tiny expert-choice MoR (decisive routers, so depths vary) with a byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {**{t: i for i, t in enumerate(SPECIALS)}, **{c: i + len(SPECIALS) for i, c in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    torch.manual_seed(0)
    config = MoRConfig.from_preset("tiny", vocab_size=320, initializer_range=0.2, sharing="middle_cycle",
                                   num_recursions=3, router="expert")
    model = MoRForCausalLM(config)
    for router in model.model.expert.routers:
        router.net.weight.data.mul_(10)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    if chat_template:
        config_file = {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config_file))
    return model.eval()


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
