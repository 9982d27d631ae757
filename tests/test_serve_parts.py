"""The server's parts on their own: incremental text with stop strings, chat templates, Prometheus metrics, the
request checks, the engine worker, the listening socket and model loading."""

import asyncio
import json
import socket

import pytest
import torch

pytest.importorskip("jinja2", reason="chat templates need the serve extra: pip install 'mor[serve]'")

from helpers import byte_tokenizer, make_decisive, tokens, wait_for  # noqa: E402

from mor.infer.engine import Engine  # noqa: E402
from mor.infer.sampling import SamplingParams  # noqa: E402
from mor.serve.chat import ChatTemplateError, end_of_turn_token, load_chat_template  # noqa: E402
from mor.serve.detokenize import Detokenizer  # noqa: E402
from mor.serve.metrics import Histogram, Metrics, parse  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def detokenizer(tokenizer, stop=()):
    return Detokenizer(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), stop, {0})


def test_text_waits_for_the_last_byte_of_a_character(tokenizer):
    ids = tokenizer.encode("aé€b").ids
    assert len(ids) == 7  # 1 + 2 + 3 + 1 bytes
    text = detokenizer(tokenizer)
    pieces = []
    for token in ids:
        assert text.feed([token]) == 1
        pieces.append(text.take(final=False))
    assert pieces == ["a", "", "é", "", "", "€", "b"]


def test_an_unfinished_character_is_flushed_at_the_end_and_end_tokens_are_not_text(tokenizer):
    text = detokenizer(tokenizer)
    assert text.feed(tokenizer.encode("a€").ids[:2] + [0]) == 3
    assert text.take(final=False) == "a" and text.take(final=True) == "\ufffd"


def test_a_stop_string_across_tokens_cuts_the_text_and_counts_the_token_that_completed_it(tokenizer):
    text = detokenizer(tokenizer, stop=["lo w", "zz"])
    ids = tokenizer.encode("hello world").ids
    assert text.feed(ids[:4]) == 4 and text.take(final=False) == "hel"  # "l" may begin "lo w": held back
    assert text.feed(ids[4:6]) == 2 and text.take(final=False) == ""
    assert text.feed(ids[6:]) == 1 and text.stopped  # the "w" completed it; the rest is not consumed
    assert text.take(final=False) == "" and text.text == "hel"


def test_held_back_text_goes_out_once_it_cannot_begin_a_stop_string(tokenizer):
    text = detokenizer(tokenizer, stop=["abc"])
    assert text.feed(tokenizer.encode("xab").ids) == 3 and text.take(final=False) == "x"
    assert text.feed(tokenizer.encode("d").ids) == 1 and text.take(final=False) == "abd"
    assert not text.stopped


def test_chat_templates_come_from_the_jinja_file_or_the_tokenizer_config(tmp_path):
    assert load_chat_template(tmp_path) is None and end_of_turn_token(tmp_path) is None
    config = {"eos_token": {"content": "<|im_end|>"}, "bos_token": "<s>",
              "chat_template": [{"name": "tool_use", "template": "tools"},
                                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}"
                                 "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = load_chat_template(tmp_path)
    assert template.render([{"role": "user", "content": "hi"}]) == "<s>user: hi<|im_end|>"
    assert end_of_turn_token(tmp_path) == "<|im_end|>"
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}{% endif %}"
        "{{ messages[0]['content'] }}{% if add_generation_prompt %} =>{% endif %}")
    template = load_chat_template(tmp_path)  # the file wins over the config's entry
    assert template.render([{"role": "user", "content": "hi"}]) == "hi =>"
    with pytest.raises(ChatTemplateError, match="start with a user turn"):
        template.render([{"role": "system", "content": "x"}])


def test_metrics_render_prometheus_text_that_parses_back():
    histogram = Histogram([0.1, 1.0])
    for value in (0.05, 0.1, 0.5, 7.0):
        histogram.observe(value)
    assert histogram.lines("h") == ['h_bucket{le="0.1"} 2', 'h_bucket{le="1.0"} 3', 'h_bucket{le="+Inf"} 4',
                                    "h_sum 7.65", "h_count 4"]
    metrics = Metrics(kv_pages_total=64)
    metrics.admitted(5)
    metrics.generated([1, 2, 3, 2], now=100.0)
    metrics.finish("length", arrival=99.0, first_token=99.5, tokens=4, now=101.0)
    metrics.load(waiting=2, running=3, kv_pages_used=7)
    assert metrics.tokens_per_second(now=105.0) == 0.4 and metrics.tokens_per_second(now=200.0) == 0
    text = metrics.render()
    assert "# TYPE mor_time_to_first_token_seconds histogram" in text
    samples = parse(text)
    assert samples['mor_requests_total{finish_reason="length"}'] == 1
    assert samples["mor_recursion_depth_mean"] == 2.0
    assert samples['mor_generation_tokens_by_depth_total{depth="2"}'] == 2
    assert (samples["mor_requests_waiting"], samples["mor_requests_running"], samples["mor_kv_pages_used"]) == (2, 3, 7)
    assert samples['mor_time_to_first_token_seconds_bucket{le="0.5"}'] == 1
    assert samples["mor_time_per_output_token_seconds_sum"] == 0.5  # 1.5 s for the 3 tokens after the first


def test_a_hugging_face_llama_folder_or_a_gguf_is_served_through_the_llama_import(tmp_path, tokenizer):
    pytest.importorskip("transformers", reason="the Llama reference needs the interop extra")
    from test_interop import assert_same_logits, tiny_llama, write_gguf

    from mor.serve.server import load_served_model

    hf = tiny_llama(vocab_size=320, eos_token_id=4)
    hf.save_pretrained(tmp_path / "llama")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_served_model(str(tmp_path / "llama"), None, "cpu", "auto")
    tokenizer.save(str(tmp_path / "llama" / "tokenizer.json"))
    model, text_tokenizer = load_served_model(str(tmp_path / "llama"), None, "cpu", "auto")
    assert_same_logits(model, hf, tokens())
    assert text_tokenizer.vocab_size == tokenizer.get_vocab_size()
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate installed")
    write_gguf(hf, tmp_path / "tiny.gguf")
    model, _ = load_served_model(str(tmp_path / "tiny.gguf"), str(tmp_path / "llama"), "cpu", "auto")
    assert_same_logits(model, hf, tokens())
    write_gguf(hf, tmp_path / "llama" / "tiny.gguf")  # with a tokenizer.json beside it, no --tokenizer needed
    model, text_tokenizer = load_served_model(str(tmp_path / "llama" / "tiny.gguf"), None, "cpu", "auto")
    assert_same_logits(model, hf, tokens())
    assert text_tokenizer.path.parent == tmp_path / "llama"


def test_a_mor_checkpoint_is_served_as_mor_pretrained_loads_it(tmp_path, tokenizer):
    from mor.pretrained import load_model_and_tokenizer
    from mor.serve.server import load_served_model

    make_decisive("expert", vocab_size=320).save_pretrained(tmp_path / "mor")
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        load_served_model(str(tmp_path / "mor"), None, "cpu", "auto")
    tokenizer.save(str(tmp_path / "mor" / "tokenizer.json"))
    model, _ = load_served_model(str(tmp_path / "mor"), None, "cpu", "auto")
    reference, _ = load_model_and_tokenizer(tmp_path / "mor", device="cpu")
    assert model.config == reference.config and not model.training
    ids = tokens(vocab=320)
    assert torch.equal(model(ids).logits, reference(ids).logits)
    with pytest.raises(FileNotFoundError, match="does not exist; give a mor checkpoint folder, a Hugging Face"):
        load_served_model(str(tmp_path / "nowhere"), None, "cpu", "auto")


# ---------------------------------------------------------------------------------------------- requests
def test_the_engine_checks_a_request_s_depth_as_add_does_and_words_one_prompt_for_a_server():
    engine = Engine(make_decisive("expert"), max_batch_slots=1, max_seq_len=32, page_size=4, extra_recursions=1)
    for depth, message in ((dict(max_recursions=0), "max_recursions must be at least 1"),
                           (dict(extra_recursions=2), "built for at most 1"),
                           (dict(max_recursions=1, extra_recursions=1), "give either max_recursions")):
        with pytest.raises(ValueError, match=message):
            engine.check([1, 2], 4, None, **depth)
        with pytest.raises(ValueError, match=message):
            engine.add([1, 2], 4, **depth)
    engine.check([1, 2], 4, None, extra_recursions=1)
    engine.check([1, 2], 4, None, max_recursions=2)
    with pytest.raises(ValueError, match=r"^the prompt: token ids must lie in \[0, 256\)$"):
        engine.check([1, 999], 4, None)
    with pytest.raises(ValueError, match=r"^prompt 3: token ids"):  # generate()'s numbering
        engine.check([1, 999], 4, 3)
    assert not engine.busy


def test_the_worker_counts_each_request_as_the_server_ended_it():
    """One row, so the second request waits. Cancelled while it waits, the engine drops it at once and says so,
    and the worker ends it as "cancelled"; the running one, cancelled because a stop string ended its text, is
    counted "stop", as its client was told."""
    from mor.serve.worker import EngineWorker, Job

    engine = Engine(make_decisive("expert"), max_batch_slots=1, max_seq_len=64, page_size=4)
    metrics = Metrics(engine.cache.pool.num_pages)
    worker = EngineWorker(engine, [], max_queue=1, metrics=metrics)  # no end token: only a cancel ends them early
    worker.start()

    async def requests() -> list[int]:
        loop = asyncio.get_running_loop()
        running = worker.submit(Job([1, 2, 3], 60, SamplingParams(), 0), loop)
        waiting = worker.submit(Job([4, 5], 60, SamplingParams(), 0), loop)
        first = await anext(aiter(running))  # it holds the row, the other one waits
        waiting.cancel()
        running.cancel("stop")
        return first.tokens

    try:
        assert asyncio.run(requests())
        wait_for(lambda: sum(metrics.finished.values()) == 2)
        wait_for(lambda: not engine.busy)
    finally:
        worker.stop()
    assert metrics.finished == {"cancelled": 1, "stop": 1}
    assert engine.cache.pages_in_use() == 0


def test_the_listener_queues_a_client_that_connects_before_the_server_accepts():
    """The start-up line names the port before uvicorn accepts: a client that connects at once must wait in the
    backlog, not be refused."""
    from mor.serve.server import listen

    with listen("127.0.0.1", 0) as listener:
        with socket.create_connection(listener.getsockname(), timeout=5) as client:
            accepted, _ = listener.accept()
            accepted.sendall(b"ok")
            assert client.recv(2) == b"ok"
            accepted.close()
