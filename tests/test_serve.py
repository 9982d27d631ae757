"""``mor serve``: a real server process on 127.0.0.1 with a tiny random MoR, driven by the official ``openai`` client
and by raw HTTP. Greedy output must equal ``model.generate()`` token for token (and depth for depth)."""

import asyncio
import gc
import http.client
import json
import signal
import socket
import time
import warnings

import pytest
import torch

pytest.importorskip("starlette", reason="mor serve needs the serve extra: pip install 'mor[serve]'")
pytest.importorskip("uvicorn", reason="mor serve needs the serve extra: pip install 'mor[serve]'")
openai = pytest.importorskip("openai", reason="the client tests need the openai package (the dev extra)")
pytestmark = pytest.mark.slow  # a server process

from helpers import (CONTEXT, END_TOKENS, ServerProcess, events, open_stream, render_chat,  # noqa: E402
                           wait_for, write_checkpoint)
from tokenizers import Tokenizer  # noqa: E402

MODEL = "tiny-mor"  # the checkpoint folder's name: what the server calls its model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve") / MODEL
    folder.mkdir()
    model = write_checkpoint(folder)
    return folder, model, Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    # 8 rows for 32 concurrent clients: most of them queue. Prompts of up to 12 tokens go through the decoding loop,
    # longer ones are prefilled: the tests below send both.
    process = ServerProcess(checkpoint[0], tmp_path_factory.mktemp("log") / "server.log", "--max-batch", "8",
                            "--extra-recursions", "1", "--loop-prompt-tokens", "12")
    yield process
    assert process.stop() == 0, process.log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def reference(model, tokenizer, text: str, max_tokens: int, **kwargs) -> tuple[list[int], list[int], str]:
    """What generate() gives for ``text``: token ids, depths, and the text (end tokens left out)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, eos_token_id=END_TOKENS, **kwargs)
    tokens = out.sequences()[0]
    return tokens, out.depths[0, :len(tokens)].tolist(), tokenizer.decode([t for t in tokens if t not in END_TOKENS])


# ---------------------------------------------------------------------------------------------- the openai client
def test_completions_through_the_openai_client_equal_generate(checkpoint, client):
    _, model, tokenizer = checkpoint
    tokens, depths, text = reference(model, tokenizer, "Once upon a time", 40)
    assert len(set(depths)) > 1, "depths should vary in this test"
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0,
                                      extra_body={"return_depths": True})
    choice = reply.choices[0]
    assert (choice.token_ids, choice.depths, choice.text) == (tokens, depths, text)
    assert choice.finish_reason == ("stop" if tokens[-1] in END_TOKENS else "length")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (16, len(tokens))

    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_depths": True}))
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert "".join(c.text for c in streamed) == text
    assert sum((c.token_ids for c in streamed), []) == tokens and sum((c.depths for c in streamed), []) == depths
    assert streamed[-1].finish_reason == choice.finish_reason and chunks[-1].usage.completion_tokens == len(tokens)
    assert len(streamed) > 3, "tokens should arrive as they are generated, not in one piece"


def test_chat_completions_through_the_openai_client_equal_generate(checkpoint, client):
    _, model, tokenizer = checkpoint
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    tokens, _, text = reference(model, tokenizer, render_chat(messages), 30)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == text
    assert reply.usage.completion_tokens == len(tokens)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=30,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_a_sampled_request_is_reproducible_from_its_seed(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="abc", max_tokens=24, temperature=0.9, top_p=0.95,
                                         seed=seed, extra_body={"top_k": 50}).choices[0].text

    assert sample(7) == sample(7) != sample(8)


def test_stop_strings_cut_the_text_and_end_the_request(checkpoint, server, client):
    _, model, tokenizer = checkpoint
    _, _, text = reference(model, tokenizer, "Hello", 60)
    stopped, cancelled = 'mor_requests_total{finish_reason="stop"}', 'mor_requests_total{finish_reason="cancelled"}'
    before = server.metrics()
    stop = text[12:15]
    cut = text[:text.index(stop)]
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=60, temperature=0, stop=[stop, "\x00z"])
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (cut, "stop")
    assert reply.usage.completion_tokens < 60
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=60, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"
    # The metrics count both requests as the client saw them end: "stop", not "cancelled" (the server cancels
    # the rest of a request that a stop string ended).
    metrics = wait_for(lambda: (m := server.metrics()).get(stopped, 0) == before.get(stopped, 0) + 2 and m)
    assert metrics.get(cancelled, 0) == before.get(cancelled, 0) and metrics["mor_requests_running"] == 0


def test_test_time_depth_per_request(checkpoint, client):
    _, model, tokenizer = checkpoint
    for options in ({"max_recursions": 1}, {"extra_recursions": 1}):
        tokens, depths, _ = reference(model, tokenizer, "abc", 20, **options)
        choice = client.completions.create(model=MODEL, prompt="abc", max_tokens=20, temperature=0,
                                           extra_body={**options, "return_depths": True}).choices[0]
        assert (choice.token_ids, choice.depths) == (tokens, depths)
    assert max(depths) == 4, "an extra recursion should take some tokens past the trained depth of 3"


def test_models_health_and_metrics(server, client):
    (card,) = client.models.list().data
    assert card.id == MODEL and card.max_model_len == CONTEXT and card.num_recursions == 3
    assert server.request("GET", "/health")[:1] == (200,)
    status, headers, _ = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    metrics = server.metrics()
    for name in ("mor_generation_tokens_per_second", "mor_requests_waiting", "mor_requests_running",
                 "mor_kv_pages_used", "mor_recursion_depth_mean", "mor_time_to_first_token_seconds_count",
                 "mor_time_per_output_token_seconds_count", 'mor_requests_total{finish_reason="length"}'):
        assert name in metrics
    assert 1 <= metrics["mor_recursion_depth_mean"] <= 4 and metrics["mor_kv_pages_total"] > 0


# ---------------------------------------------------------------------------------------------- concurrency
def test_32_concurrent_streaming_clients_get_what_generate_gives(checkpoint, server):
    _, model, tokenizer = checkpoint
    prompts = [f"client {i}: " + "ab" * (i % 5) for i in range(32)]
    lengths = [6 + i % 11 for i in range(32)]
    expected = [reference(model, tokenizer, p, n)[0] for p, n in zip(prompts, lengths)]
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

    async def one(prompt: str, max_tokens: int) -> tuple[list[int], int]:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"return_depths": True})
        tokens, usage = [], None
        async for chunk in stream:
            tokens += chunk.choices[0].token_ids if chunk.choices else []
            usage = chunk.usage or usage
        return tokens, usage.completion_tokens

    async def all_clients():
        try:
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))
        finally:
            await client.close()

    results = asyncio.run(all_clients())
    assert [tokens for tokens, _ in results] == expected
    assert [count for _, count in results] == [len(tokens) for tokens in expected]
    metrics = wait_for(lambda: (m := server.metrics())["mor_requests_running"] == 0 and m)
    assert metrics["mor_kv_pages_used"] == 0 and metrics["mor_requests_waiting"] == 0


def test_a_client_that_goes_away_cancels_its_request_and_frees_its_pages(server):
    cancelled = 'mor_requests_total{finish_reason="cancelled"}'
    before = server.metrics().get(cancelled, 0)
    connection, response = open_stream(server.port, {"model": MODEL, "prompt": "Hello", "max_tokens": 200,
                                                     "temperature": 0})
    stream = events(response)
    next(stream), next(stream)
    metrics = server.metrics()
    assert metrics["mor_requests_running"] == 1 and metrics["mor_kv_pages_used"] > 0
    connection.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    connection.close()
    metrics = wait_for(lambda: (m := server.metrics()).get(cancelled, 0) == before + 1 and m)
    assert metrics["mor_kv_pages_used"] == 0 and metrics["mor_requests_running"] == 0

    # A non-streaming client that goes away is cancelled too.
    raw = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 200, "temperature": 0}).encode()
    raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: server.metrics()["mor_requests_running"] == 1)
    raw.close()
    metrics = wait_for(lambda: (m := server.metrics()).get(cancelled, 0) == before + 2 and m)
    assert metrics["mor_kv_pages_used"] == 0


# ---------------------------------------------------------------------------------------------- bad input
LONG = "x" * (CONTEXT + 10)
OK = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", '{"model": "tiny-mor", "prompt": ', 400, None),
    ("not an object", "/v1/completions", "[1, 2]", 400, None),
    ("no model", "/v1/completions", {"prompt": "Hello"}, 400, "model"),
    ("max_tokens of the wrong type", "/v1/completions", {**OK, "max_tokens": "ten"}, 400, "max_tokens"),
    ("temperature of the wrong type", "/v1/completions", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("stream of the wrong type", "/v1/completions", {**OK, "stream": "yes"}, 400, "stream"),
    ("prompt of the wrong type", "/v1/completions", {**OK, "prompt": 5}, 400, "prompt"),
    ("a batch of prompts", "/v1/completions", {**OK, "prompt": ["a", "b"]}, 400, "prompt"),
    ("prompt longer than the context", "/v1/completions", {**OK, "prompt": LONG}, 400, "prompt"),
    ("max_tokens 0", "/v1/completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {**OK, "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens past the context", "/v1/completions", {**OK, "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("negative temperature", "/v1/completions", {**OK, "temperature": -0.5}, 400, "temperature"),
    ("top_p 0", "/v1/completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("top_p above 1", "/v1/completions", {**OK, "top_p": 1.5}, 400, "top_p"),
    ("top_k 0", "/v1/completions", {**OK, "top_k": 0}, 400, "top_k"),
    ("n above 1", "/v1/completions", {**OK, "n": 2}, 400, "n"),
    ("too many stop strings", "/v1/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("an unknown model", "/v1/completions", {**OK, "model": "gpt-4"}, 404, "model"),
    ("an empty prompt", "/v1/completions", {**OK, "prompt": ""}, 400, "prompt"),
    ("an empty list of token ids", "/v1/completions", {**OK, "prompt": []}, 400, "prompt"),
    ("token ids outside the vocabulary", "/v1/completions", {**OK, "prompt": [5, 99999]}, 400, None),
    ("max_recursions 0", "/v1/completions", {**OK, "max_recursions": 0}, 400, "max_recursions"),
    ("more extra recursions than allowed", "/v1/completions", {**OK, "extra_recursions": 5}, 400,
     "extra_recursions"),
    ("both depth options", "/v1/completions", {**OK, "max_recursions": 1, "extra_recursions": 1}, 400,
     "max_recursions"),
    ("an empty message list", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("messages of the wrong type", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("a message without a role", "/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400,
     "messages.0.role"),
    ("message content of the wrong type", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("chat past the context", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("logprobs, which this server does not give", "/v1/completions", {**OK, "logprobs": 2}, 400, "logprobs"),
    ("an unknown endpoint", "/v1/embeddings", OK, 404, None),
]


def test_every_bad_input_gets_a_4xx_in_the_openai_error_shape_and_the_server_keeps_serving(server):
    failures = []
    for name, path, body, status, param in BAD_REQUESTS:
        got, headers, raw = server.request("POST", path, body)
        error = json.loads(raw).get("error", {}) if headers.get("content-type") == "application/json" else {}
        if got != status or set(error) != {"message", "type", "param", "code"} or error["param"] != param \
                or not error["message"]:
            failures.append(f"{name}: {got} {raw[:300]!r}")
    assert not failures, "\n".join(failures)
    # The engine's checks speak of the one prompt of the request, and the server's fix, not Python's.
    messages = {name: json.loads(server.request("POST", path, body)[2])["error"]["message"]
                for name, path, body, _, _ in BAD_REQUESTS
                if name in ("token ids outside the vocabulary", "more extra recursions than allowed")}
    assert messages["token ids outside the vocabulary"] == "the prompt: token ids must lie in [0, 320)"
    assert "mor serve --extra-recursions N" in messages["more extra recursions than allowed"]
    assert server.request("GET", "/v1/completions")[0] == 405
    assert server.request("POST", "/v1/completions", OK)[0] == 200


def test_a_missing_checkpoint_or_a_port_in_use_is_one_line_naming_the_fix(checkpoint, tmp_path, capsys):
    from mor.cli import main

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        assert main(["serve", str(tmp_path / "nowhere"), "--port", "0"]) == 2  # bad input (mor.errors)
        gc.collect()
    assert "does not exist; give a mor checkpoint folder" in capsys.readouterr().err
    unclosed = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not unclosed, f"a failed load must close the listening socket, not leave it to the collector: {unclosed}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert main(["serve", str(checkpoint[0]), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- a small server
@pytest.fixture
def small_server(tmp_path):
    """Starts servers of one row and a queue of one, on the same model with a tokenizer that has no chat template."""
    folder = tmp_path / MODEL
    folder.mkdir()
    write_checkpoint(folder, chat_template=False)
    servers = []

    def start(*options: str) -> ServerProcess:
        servers.append(ServerProcess(folder, tmp_path / f"server-{len(servers)}.log", "--max-batch", "1",
                                     "--max-queue", "1", *options))
        return servers[-1]

    yield start
    for process in servers:
        process.stop(signal.SIGKILL)


def finish_reasons(response) -> list[str]:
    """The finish reasons a stream carried before it ended or was cut."""
    reasons = []
    try:
        for chunk in events(response):
            reasons += [c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]]
    except (http.client.HTTPException, OSError):
        pass
    return reasons


LONG_REQUEST = {"model": MODEL, "prompt": "Hello", "max_tokens": 240, "temperature": 0}  # about a second on a CPU


def test_a_full_queue_answers_429_with_retry_after_and_a_model_without_template_refuses_chat(small_server):
    server = small_server()
    status, _, raw = server.request("POST", "/v1/chat/completions",
                                    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "no chat template" in json.loads(raw)["error"]["message"]

    running = open_stream(server.port, LONG_REQUEST)
    next(events(running[1]))  # it holds the one row
    waiting = open_stream(server.port, LONG_REQUEST)  # its headers came: it is queued
    status, headers, raw = server.request("POST", "/v1/completions", LONG_REQUEST)
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(raw)["error"]["code"] == "queue_full"
    assert server.metrics()["mor_requests_rejected_total"] == 1
    for connection, _ in (running, waiting):
        connection.close()


def test_sigterm_drains_the_requests_in_flight_then_exits(checkpoint, small_server):
    _, model, tokenizer = checkpoint
    server = small_server("--drain-timeout", "30")
    expected, _, _ = reference(model, tokenizer, "Hello", 240)
    connection, response = open_stream(server.port, {**LONG_REQUEST, "return_depths": True})
    stream = events(response)
    tokens = next(stream)["choices"][0]["token_ids"]
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        socket.create_connection(("127.0.0.1", server.port))
    after = [chunk["choices"][0] for chunk in stream]
    assert after, "the request should still have been running when SIGTERM came"
    assert tokens + sum((c["token_ids"] for c in after), []) == expected and after[-1]["finish_reason"] == "length"
    assert server.process.wait(10) == 0
    connection.close()


def test_sigterm_cuts_what_has_not_finished_by_the_drain_deadline(small_server):
    server = small_server("--drain-timeout", "0.5")
    running, waiting = open_stream(server.port, LONG_REQUEST), open_stream(server.port, LONG_REQUEST)
    next(events(running[1]))
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(15) == 0
    assert time.monotonic() - start < 5
    assert "length" not in finish_reasons(running[1]) + finish_reasons(waiting[1])
    for connection, _ in (running, waiting):
        connection.close()
