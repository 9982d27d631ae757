import io

import pytest
import torch
from helpers import ROUTED_VARIANTS, VARIANTS, make_decisive, tokens

from mor.infer import SamplingParams, generate
from mor.infer.sampling import sample
from mor.infer.page_pool import PagedCache
from mor.infer.streaming import RESET, Streamer, TextStreamer, depth_colour, depth_palette
from mor.model.kv_cache import StaticKVCache


def decode_incrementally(model, ids, cache, prefix: int, **kwargs):
    """Prefill ``prefix`` tokens, then feed the rest one at a time; logits and depths of every token."""
    outs = [model(ids[:, :prefix], routing="causal", cache=cache, **kwargs)]
    outs += [model(ids[:, t:t + 1], routing="causal", cache=cache, **kwargs) for t in range(prefix, ids.shape[1])]
    return torch.cat([o.logits for o in outs], 1), torch.cat([o.depths for o in outs], 1)


# ---------------------------------------------------------------------------------------------- caches
@pytest.mark.parametrize("cache_kind", ["static", "paged"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_decoding_equals_full_causal_forward(variant, cache_kind):
    model = make_decisive(variant)
    ids = tokens(2, 24)
    with torch.no_grad():
        full = model(ids, routing="causal")
        if cache_kind == "static":
            cache = StaticKVCache.for_model(model, batch_size=2, max_len=32)
        else:
            cache = PagedCache.for_model(model, num_rows=2, max_seq_len=32, page_size=4).view([0, 1])
        logits, depths = decode_incrementally(model, ids, cache, prefix=9)
    torch.testing.assert_close(logits, full.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(depths, full.depths)
    if variant in ROUTED_VARIANTS:
        assert len(set(full.depths.flatten().tolist())) > 1, "routing should give several depths in this test"


@pytest.mark.parametrize("variant", ["expert", "expert_share", "token", "recursive_cycle"])
def test_extra_recursions_decode_like_the_full_forward(variant):
    model = make_decisive(variant)
    ids = tokens(2, 16)
    nr = model.config.num_recursions
    with torch.no_grad():
        full = model(ids, routing="causal", extra_recursions=2)
        base = model(ids, routing="causal")
        cache = StaticKVCache.for_model(model, 2, 16, extra_recursions=2)
        logits, depths = decode_incrementally(model, ids, cache, prefix=5, extra_recursions=2)
    torch.testing.assert_close(logits, full.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(depths, full.depths)
    # Tokens that stopped before the last trained step are untouched; deeper ones go beyond it.
    assert torch.equal(full.depths[base.depths < nr], base.depths[base.depths < nr])
    assert (full.depths > nr).any() and (full.depths <= nr + 2).all()


def test_cache_streams_hold_exactly_the_tokens_that_ran_each_depth():
    model = make_decisive("expert")
    ids = tokens(2, 20)
    with torch.no_grad():
        depths = model(ids, routing="causal").depths
        static = StaticKVCache.for_model(model, 2, 24)
        model(ids, routing="causal", cache=static)
        paged = PagedCache.for_model(model, 2, 24, page_size=4)
        model(ids, routing="causal", cache=paged.view([0, 1]))
    plan = model.model.plan
    expected = {p: ids.numel() for p in (*plan.prelude, *plan.coda)}
    for r, step in enumerate(plan.steps, start=1):
        expected.update({p: int((depths >= r).sum()) for p in step})
    assert static.entries() == expected
    assert paged.entries() == expected
    entry = 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    assert static.used_nbytes() == paged.used_nbytes() == sum(expected.values()) * entry
    assert static.used_nbytes() < static.nbytes()
    # Paged memory follows the entries: every stream of every row needs ceil(entries / page) pages.
    assert paged.pages_in_use() < len(expected) * 2 * 24 / 4
    paged.release(0)
    paged.release(1)
    assert paged.pages_in_use() == 0 and paged.used_nbytes() == 0


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_prompt_batch_prefill_caches_what_the_per_layer_path_does(variant):
    """PagedPrefill (keep each position's keys/values, write all pages at the end) against PagedRows (write and
    read the pages at every layer): ragged left-padded prompts, the same entries, then the same decoding."""
    model = make_decisive(variant)
    lengths = [9, 3, 14]
    ids = torch.zeros(3, 14, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, 14 - n:], mask[i, 14 - n:] = tokens(1, n, seed=n)[0], 1
    caches = [PagedCache.for_model(model, num_rows=4, max_seq_len=24, page_size=4) for _ in range(2)]
    rows = [2, 0, 3]
    with torch.no_grad():
        per_layer = model(ids, attention_mask=mask, routing="causal", cache=caches[0].view(rows))
        batch = caches[1].prefill(rows)
        kept = model(ids, attention_mask=mask, routing="causal", cache=batch)
        batch.commit()
    torch.testing.assert_close(kept.logits[mask.bool()], per_layer.logits[mask.bool()], rtol=1e-4, atol=1e-4)
    assert torch.equal(kept.depths, per_layer.depths)
    a, b = (c.pool for c in caches)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.lengths, b.lengths) and torch.equal(a.held, b.held)
    assert caches[0].entries() == caches[1].entries() and caches[1].used_nbytes() > 0
    for s in range(a.num_streams):
        for row in rows:
            n = int(a.counts[s, row])
            k0, v0, p0 = caches[0].pages.gather(a.tables[s, row][None, : a.max_pages])
            k1, v1, p1 = caches[1].pages.gather(b.tables[s, row][None, : b.max_pages])
            assert torch.equal(p0[:, :n], p1[:, :n])
            torch.testing.assert_close(k1[:, :, :n], k0[:, :, :n], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v1[:, :, :n], v0[:, :, :n], rtol=1e-4, atol=1e-4)
    step = tokens(3, 1, seed=99)
    with torch.no_grad():
        outs = [model(step, routing="causal", cache=c.view(rows)) for c in caches]
    torch.testing.assert_close(outs[1].logits, outs[0].logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[1].depths, outs[0].depths)


def test_a_prompt_batch_that_the_pool_cannot_hold_takes_no_page():
    model = make_decisive("vanilla")
    cache = PagedCache.for_model(model, num_rows=2, max_seq_len=16, page_size=4, num_pages=5)
    batch = cache.prefill([0, 1])
    with torch.no_grad():
        model(tokens(2, 12), routing="causal", cache=batch)
    with pytest.raises(MemoryError, match="page pool is exhausted"):
        batch.commit()
    assert cache.pages_in_use() == 0 and not cache.pool.lengths.any()
    with pytest.raises(ValueError, match="does not fit a KV cache of at most 16"):
        model(tokens(1, 17), routing="causal", cache=cache.prefill([0]))
    with pytest.raises(ValueError, match="distinct rows"):
        cache.prefill([1, 1])
    with pytest.raises(ValueError, match="document_ids"):
        model(tokens(1, 4), routing="causal", document_ids=torch.zeros(1, 4, dtype=torch.long),
              cache=cache.prefill([0]))
    batch = cache.prefill([0])
    with torch.no_grad():
        model(tokens(1, 4), routing="causal", cache=batch)
    batch.commit()
    with pytest.raises(ValueError, match="fills empty rows; release rows \\[0\\] first"):
        cache.prefill([0])


def test_kv_sharing_keeps_one_stream_per_distinct_layer():
    recursion, share = make_decisive("expert"), make_decisive("expert_share")
    assert len(recursion.model.cache_positions()) == recursion.model.plan.num_positions
    assert len(share.model.cache_positions()) == share.config.num_unique_layers


def test_paged_pool_exhaustion_and_length_limit_raise_clear_errors():
    model = make_decisive("vanilla")
    cache = PagedCache.for_model(model, num_rows=1, max_seq_len=8, page_size=4, num_pages=3)
    with pytest.raises(MemoryError, match="page pool is exhausted"):
        model(tokens(1, 8), cache=cache.view([0]))
    cache = StaticKVCache.for_model(model, 1, 8)
    model(tokens(1, 6), cache=cache)
    with pytest.raises(ValueError, match="KV cache holds at most 8"):
        model(tokens(1, 3), cache=cache)


def test_cache_needs_causal_routing():
    model = make_decisive("expert")
    with pytest.raises(ValueError, match="routing='causal'"):
        model(tokens(1, 4), routing="topk", cache=StaticKVCache.for_model(model, 1, 8))


# ---------------------------------------------------------------------------------------------- generate
def greedy_reference(model, prompt: torch.Tensor, steps: int):
    """Greedy continuation by full causal forwards over the growing sequence (no cache)."""
    ids, depths = prompt[None], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(ids, routing="causal")
            ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], 1)
            depths.append(int(out.depths[0, -1]))
    return ids[0, prompt.numel():].tolist(), depths


@pytest.mark.parametrize("cache_kind", ["static", "paged"])
@pytest.mark.parametrize("variant", ["vanilla", "recursive_middle_cycle_share", "expert", "expert_share", "token"])
def test_greedy_generate_equals_uncached_greedy_decoding(variant, cache_kind):
    model = make_decisive(variant)
    prompt = tokens(1, 6)[0]
    out = model.generate(prompt[None], max_new_tokens=10, cache_implementation=cache_kind)
    expected, depths = greedy_reference(model, prompt, 10)
    assert out.sequences() == [expected]
    assert out.depths[0].tolist() == depths
    assert len(set(expected)) > 2, "the test model should not repeat one token"


@pytest.mark.parametrize("variant", ["vanilla", "recursive_sequence_share", "expert", "expert_aux_router_share",
                                     "token"])
def test_left_padded_batch_equals_prompts_run_one_by_one(variant):
    model = make_decisive(variant)
    prompts = [tokens(1, n, seed=n)[0] for n in (9, 4, 6)]
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.numel():] = p
        mask[row, width - p.numel():] = 1
    batched = generate(model, ids, mask, max_new_tokens=8)
    for row, p in enumerate(prompts):
        alone = generate(model, p[None], max_new_tokens=8)
        assert batched.sequences()[row] == alone.sequences()[0]
        assert torch.equal(batched.depths[row], alone.depths[0])


def test_rows_that_end_stop_while_the_others_continue():
    model = make_decisive("expert")
    ids = tokens(3, 5)
    free = generate(model, ids, max_new_tokens=8)
    eos = free.sequences()[0][2]  # row 0 ends at its third token
    ended = generate(model, ids, max_new_tokens=8, eos_token_id=eos)
    for row, seq in enumerate(free.sequences()):
        cut = seq.index(eos) + 1 if eos in seq else len(seq)
        assert ended.sequences()[row] == seq[:cut]
        assert ended.tokens[row, cut:].eq(model.config.pad_token_id).all()
        assert ended.depths[row, cut:].eq(0).all()
    assert ended.lengths[0] <= 3


class CharTokenizer:
    """Token i is the character chr(97 + i % 26): enough to test text-level stopping and streaming."""

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_end_a_row_once_its_text_contains_them():
    model = make_decisive("vanilla")
    prompt = tokens(1, 4)
    free = generate(model, prompt, max_new_tokens=10).sequences()[0]
    text = CharTokenizer().decode(free)
    stop = text[4:6]
    out = generate(model, prompt, max_new_tokens=10, stop_strings=[stop], tokenizer=CharTokenizer())
    seq = out.sequences()[0]
    assert stop in CharTokenizer().decode(seq) and stop not in CharTokenizer().decode(seq[:-1])
    assert seq == free[:len(seq)]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, prompt, max_new_tokens=2, stop_strings=["x"])


def test_max_recursions_caps_generation_depth():
    model = make_decisive("expert")
    out = generate(model, tokens(2, 6), max_new_tokens=6, max_recursions=2)
    assert out.depths.max() <= 2
    assert generate(model, tokens(2, 6), max_new_tokens=6).depths.max() == 3


def test_sampling_is_seeded_and_filters_behave():
    model = make_decisive("token")
    ids = tokens(2, 5)
    a = generate(model, ids, max_new_tokens=12, do_sample=True, seed=3)
    b = generate(model, ids, max_new_tokens=12, do_sample=True, seed=3)
    c = generate(model, ids, max_new_tokens=12, do_sample=True, seed=4)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    greedy = generate(model, ids, max_new_tokens=12)
    for filtered in (dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0)):
        out = generate(model, ids, max_new_tokens=12, do_sample=True, seed=5, **filtered)
        assert torch.equal(out.tokens, greedy.tokens), filtered


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    gen = torch.Generator().manual_seed(0)
    top_k = sample(logits, SamplingParams(do_sample=True, top_k=2), gen)
    assert set(top_k.tolist()) == {0, 1}
    top_p = sample(logits, SamplingParams(do_sample=True, top_p=0.7), gen)  # 0.5 + 0.3 reach 0.7
    assert set(top_p.tolist()) == {0, 1}
    # Temperature 0.5 squares the odds: P(0) = 0.25 / (0.25 + 0.09) within the top two.
    hot = sample(logits, SamplingParams(do_sample=True, top_k=2, temperature=0.5), gen)
    assert abs((hot == 0).float().mean().item() - 0.25 / 0.34) < 0.04


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5, do_sample=True), "temperature"),
    (dict(top_p=0.0, do_sample=True), "top_p"),
    (dict(top_p=1.5, do_sample=True), "top_p"),
    (dict(top_k=0, do_sample=True), "top_k"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(cache_implementation="dynamic"), "cache_implementation"),
])
def test_bad_sampling_parameters_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(make_decisive("vanilla"), tokens(1, 4), **{"max_new_tokens": 2, **kwargs})


def test_bad_prompts_raise_clear_errors():
    model = make_decisive("vanilla")
    context = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="more than the model's context"):
        generate(model, tokens(1, context + 1), max_new_tokens=1)
    with pytest.raises(ValueError, match="at most 6 new tokens"):
        generate(model, tokens(1, context - 6), max_new_tokens=10)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, tokens(2, 3), torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="left padding"):
        generate(model, tokens(2, 3), torch.tensor([[1, 1, 1], [1, 1, 0]]))


def test_zero_new_tokens_returns_an_empty_result():
    out = generate(make_decisive("vanilla"), tokens(2, 3), max_new_tokens=0)
    assert out.tokens.shape == (2, 0) and out.sequences() == [[], []]


# ---------------------------------------------------------------------------------------------- streaming
def test_streamers_receive_the_prompt_then_every_token_with_its_depth():
    model = make_decisive("expert")
    seen = []

    class Recorder(Streamer):
        def on_tokens(self, ids, depths):
            seen.append((ids, depths))

    prompt = tokens(2, 4)
    out = generate(model, prompt, max_new_tokens=5, streamer=Recorder())
    assert [ids for ids, _ in seen] == out.tokens.T.tolist()
    assert [d for _, d in seen] == out.depths.T.tolist()


def test_text_streamer_prints_the_text_and_colours_depths():
    model = make_decisive("expert")
    buffer = io.StringIO()
    streamer = TextStreamer(CharTokenizer(), color_depth=True, stream=buffer,
                            num_recursions=model.config.num_recursions)
    out = generate(model, tokens(1, 4), max_new_tokens=6, streamer=streamer)
    pieces = [(CharTokenizer().decode([t]), d) for t, d in zip(out.tokens[0].tolist(), out.depths[0].tolist())]
    expected = "".join(piece if piece.isspace() else depth_colour(d, model.config.num_recursions) + piece + RESET
                       for piece, d in pieces)  # whitespace unpainted
    assert buffer.getvalue() == expected + "\n"


def test_text_streamer_leaves_whitespace_unpainted():
    class Words:
        def decode(self, ids):
            return "".join([" to", " be\n", "\n", "or"][i] for i in ids)

    buffer = io.StringIO()
    streamer = TextStreamer(Words(), color_depth=True, stream=buffer, num_recursions=2)
    streamer.put(torch.tensor([0]))  # the prompt
    for token, depth in ((0, 1), (1, 2), (2, 1), (3, 2)):
        streamer.put(torch.tensor([token]), torch.tensor([depth]))
    one, two = depth_colour(1, 2), depth_colour(2, 2)
    assert buffer.getvalue() == f" {one}to{RESET} {two}be{RESET}\n\n{two}or{RESET}"


def test_the_terminal_paints_depths_in_the_colours_of_the_html_and_png_views():
    palette = depth_palette(3)
    assert len(palette) == 4 and palette[0] == "#d9d9d9"
    for depth, hex_colour in enumerate(palette):
        rgb = ";".join(str(int(hex_colour[i:i + 2], 16)) for i in (1, 3, 5))
        assert depth_colour(depth, 3).startswith(f"\033[48;2;{rgb}m")
    assert depth_colour(9, 3) == depth_colour(3, 3)  # extra recursions look like the deepest trained one
    style = pytest.importorskip("mor.viz.style", reason="needs matplotlib (pip install 'mor[viz]')")
    assert style.depth_colors(3) == palette
