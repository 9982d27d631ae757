import pytest
import torch
from helpers import make_decisive, tokens

from mor.infer.engine import Engine

PROMPT_LENGTHS = (1, 5, 3, 7, 2)
NEW_TOKENS = [6, 9, 4, 7, 5]


def prompts(lengths=PROMPT_LENGTHS) -> list[list[int]]:
    return [tokens(1, n, seed=n)[0].tolist() for n in lengths]


def assert_matches_generate(model, out, prompt_list, new_tokens, **kwargs):
    for prompt, count, result in zip(prompt_list, new_tokens, out.results):
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=count, **kwargs)
        assert result.tokens == reference.sequences()[0]
        assert result.depths == reference.depths[0, :len(result.tokens)].tolist()


@pytest.mark.parametrize("variant", ["vanilla", "recursive_cycle", "recursive_sequence_share",
                                     "recursive_middle_cycle_share", "expert", "expert_share", "expert_aux_router",
                                     "expert_cycle_mlp", "token", "token_share"])
@pytest.mark.parametrize("loop", [0, 4, 64], ids=["prefilled", "mixed", "looped"])
def test_engine_generates_what_generate_does_token_for_token(variant, loop):
    # loop: prompts of up to this many tokens go through the decoding loop, longer ones are prefilled
    model = make_decisive(variant)
    engine = Engine(model, max_batch_slots=3, max_seq_len=32, page_size=4, loop_prompt_tokens=loop)
    out = engine.generate(prompts(), NEW_TOKENS)
    assert_matches_generate(model, out, prompts(), NEW_TOKENS)
    assert [len(r.tokens) for r in out.results] == NEW_TOKENS
    if "expert" in variant or "token" in variant:
        assert len(out.stats.depth_histogram) > 1, "depths should vary in this test"


@pytest.mark.parametrize("slots", [4, 3], ids=["a slot per row", "fewer slots than rows"])
def test_the_compiled_iteration_generates_what_generate_does(slots):
    """The compiled iteration (on the CPU here) with a slot for every row, and with fewer slots than rows (the
    oldest rows picked, idle slots padded)."""
    torch.compiler.reset()  # within dynamo's recompilation limit whatever ran before
    model = make_decisive("expert")
    engine = Engine(model, max_batch_slots=slots, max_requests=4, max_seq_len=32, page_size=4, window=4,
                    compile=True, loop_prompt_tokens=4)
    out = engine.generate(prompts(), NEW_TOKENS)
    assert_matches_generate(model, out, prompts(), NEW_TOKENS)
    assert engine.cache.pages_in_use() == 0


@pytest.mark.parametrize("variant", ["vanilla", "expert", "token_share"])
def test_fewer_block_and_tail_slots_than_requests_pick_the_oldest_rows(variant):
    # More requests in flight than the block or the tail can take at once: rows wait their turn.
    model = make_decisive(variant)
    engine = Engine(model, max_batch_slots=2, max_requests=4, tail_slots=2, max_seq_len=32, page_size=4, window=4)
    out = engine.generate(prompts(), NEW_TOKENS)
    assert_matches_generate(model, out, prompts(), NEW_TOKENS)
    assert engine.cache.pages_in_use() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("variant", ["vanilla", "recursive_sequence_share", "expert", "expert_share", "token_share"])
def test_cuda_graphs_and_the_paged_kernel_generate_what_generate_does_on_the_gpu(variant):
    torch.compiler.reset()  # every variant compiles afresh, within dynamo's recompilation limit
    model = make_decisive(variant).cuda()
    engine = Engine(model, max_batch_slots=3, max_requests=4, tail_slots=3, max_seq_len=32, page_size=4,
                    cuda_graphs=True, window=4, loop_prompt_tokens=4)  # prompts of 5 and 7 tokens are prefilled
    assert engine.runner.kernel and engine.compiled
    for _ in range(2):  # replaying the captured graphs a second time must not depend on the first run
        out = engine.generate(prompts(), NEW_TOKENS)
        assert_matches_generate(model, out, prompts(), NEW_TOKENS)
    assert engine.cache.pages_in_use() == 0
    for filters in (dict(top_p=0.8), {}):  # a draw with filters, and one by the fused sampling kernel
        sampled = [engine.generate(prompts(), NEW_TOKENS, do_sample=True, seed=3, **filters) for _ in range(2)]
        assert [r.tokens for r in sampled[0].results] == [r.tokens for r in sampled[1].results]


@pytest.mark.parametrize("loop", [0, 64], ids=["prefilled", "looped"])
def test_short_page_pool_preempts_and_recomputes_without_changing_tokens(loop):
    model = make_decisive("expert")
    lengths, new_tokens = (1, 5, 3, 7, 2, 4), [12, 9, 14, 7, 10, 11]
    engine = Engine(model, max_batch_slots=4, max_seq_len=24, page_size=2, num_pages=40, loop_prompt_tokens=loop)
    out = engine.generate(prompts(lengths), new_tokens)
    assert out.stats.preemptions > 0
    assert_matches_generate(model, out, prompts(lengths), new_tokens)
    assert engine.cache.pages_in_use() == 0
    with pytest.raises(MemoryError, match="more pages"):  # fits the up-front bound, not the pool once routed
        Engine(model, max_batch_slots=2, max_seq_len=24, page_size=2, num_pages=31).generate(prompts((7,)), 12)


def test_pages_freed_since_the_last_status_are_counted_before_new_prompts_are_admitted():
    """After a request finishes, the pool is read back before admitting more (not between two admissions, which
    would count the first ones as empty before their prefill): a pool just large enough never runs short."""
    model = make_decisive("vanilla")
    engine = Engine(model, max_batch_slots=4, max_seq_len=32, page_size=2, num_pages=90, window=4)
    engine.prepare([], ("greedy",))
    engine.add(tokens(1, 10, seed=1)[0].tolist(), 4)
    while engine.busy:
        engine.step()
    later = [tokens(1, 9, seed=2)[0].tolist(), tokens(1, 31, seed=3)[0].tolist()]
    ids = [engine.add(prompt, 1) for prompt in later]
    outputs = {}
    while engine.busy:
        for out in engine.step():
            outputs.setdefault(out.request, []).extend(out.tokens)
    for i, prompt in zip(ids, later):
        assert outputs[i] == model.generate(torch.tensor([prompt]), max_new_tokens=1).sequences()[0]
    assert engine.cache.pages_in_use() == 0


def test_the_scheduler_budgets_from_a_snapshot_of_the_pool_not_the_live_counts():
    # On the CPU, reading the pool's counts without a copy handed the scheduler the live tensor: the next windows
    # moved it on, the budget was taken from counts that were no longer true, and the pool ran dry mid-window.
    model = make_decisive("recursive_sequence_share")
    lengths, new_tokens = [8, 7, 3, 7], [14, 10, 16, 12]
    engine = Engine(model, max_batch_slots=4, max_seq_len=24, page_size=4, window=1, num_pages=27,
                    loop_prompt_tokens=4)
    out = engine.generate(prompts(lengths), new_tokens)
    assert out.stats.preemptions > 0
    assert_matches_generate(model, out, prompts(lengths), new_tokens)


@pytest.mark.parametrize("variant", ["expert", "token", "recursive_cycle"])
def test_the_default_pool_serves_requests_as_long_as_the_context_without_preempting(variant):
    # The budget counted room for an entry past the context, which the pool never gives a stream, and took a
    # stream's pages to be ceil(entries / page size) where the room kept ahead is a page more: the worst-case
    # pool refused a single request of the full context, or preempted.
    model = make_decisive(variant)
    for length in range(1, 8):
        engine = Engine(model, max_batch_slots=1, max_seq_len=8, page_size=4, window=1)
        out = engine.generate(prompts((length,)), 8 - length)
        assert_matches_generate(model, out, prompts((length,)), [8 - length])
    engine = Engine(model, max_batch_slots=2, max_seq_len=8, page_size=4, window=1)
    out = engine.generate(prompts((4, 3)), [4, 5])
    assert out.stats.preemptions == 0
    assert_matches_generate(model, out, prompts((4, 3)), [4, 5])


def test_after_a_failure_cancelling_everything_gives_a_working_engine_again():
    """A broken page budget (here forced: the pool's overflow flag) stops the run with a clear error; dropping
    every request then starts again from a free pool, and the engine serves as before."""
    model = make_decisive("expert")
    engine = Engine(model, max_batch_slots=3, max_seq_len=32, page_size=4, window=2)
    engine.prepare([], ("greedy",))
    for prompt, count in zip(prompts(), NEW_TOKENS):
        engine.add(prompt, count)
    engine.step()
    engine.cache.pool.overflow.fill_(True)
    with pytest.raises(RuntimeError, match="page budget"):
        while engine.busy:
            engine.step()
    engine.cancel_all()
    assert not engine.busy and engine.cache.pages_in_use() == 0
    out = engine.generate(prompts(), NEW_TOKENS)
    assert_matches_generate(model, out, prompts(), NEW_TOKENS)
    assert engine.cache.pages_in_use() == 0


def test_a_request_that_can_never_fit_is_refused_before_anything_runs():
    # Vanilla writes every stream: 5 streams x ceil((9 + 20) / 4) pages = 40 > 15. The short request that
    # would finish first must not be computed and lost.
    model = make_decisive("vanilla")
    engine = Engine(model, max_batch_slots=2, max_seq_len=32, page_size=4, num_pages=15)
    with pytest.raises(ValueError, match="prompt 0: 9 prompt \\+ 20 new tokens need at least 40 KV pages"):
        engine.generate([list(range(1, 10)), [3, 4]], [20, 2])
    assert engine.cache.pages_in_use() == 0


def test_more_requests_in_flight_than_block_slots_keep_the_block_full():
    model = make_decisive("token")
    lengths = PROMPT_LENGTHS * 3
    engine = Engine(model, max_batch_slots=2, max_requests=4, max_seq_len=32, page_size=4, window=2)
    out = engine.generate(prompts(lengths), 12)
    assert_matches_generate(model, out, prompts(lengths), [12] * len(lengths))
    assert out.stats.block_occupancy > 0.9  # four requests keep two slots busy, whatever their depths


def test_kv_accounting_follows_the_depths_each_token_ran():
    model = make_decisive("expert")
    nr = model.config.num_recursions
    out = Engine(model, max_batch_slots=3, max_seq_len=32, page_size=4).generate(prompts(), NEW_TOKENS)
    # Every token that went through the model: the prompt and all generated tokens but the last.
    processed = []
    for prompt, result in zip(prompts(), out.results):
        ids = torch.tensor([prompt + result.tokens[:-1]])
        processed += model(ids, routing="causal").depths[0].tolist()
    assert out.stats.kv_block_ratio == pytest.approx(sum(processed) / (len(processed) * nr))
    shared = make_decisive("expert_share")
    out = Engine(shared, max_batch_slots=3, max_seq_len=32, page_size=4).generate(prompts(), NEW_TOKENS)
    assert out.stats.kv_block_ratio == pytest.approx(1 / nr)
    vanilla = Engine(make_decisive("vanilla"), max_batch_slots=3, max_seq_len=32).generate(prompts(), NEW_TOKENS)
    assert vanilla.stats.kv_block_ratio == pytest.approx(1.0) == vanilla.stats.kv_model_ratio
    assert vanilla.stats.kv_bytes_per_token == 2 * 5 * 2 * 16 * 4  # K+V, 5 layers, 2 KV heads, dim 16, fp32


@pytest.mark.parametrize("loop", [0, 64], ids=["prefilled", "looped"])
def test_kv_accounting_counts_the_work_redone_after_preemption(loop):
    # A request preempted in the middle of its prompt is counted for the tokens it really fed, not its whole prompt.
    lengths, new_tokens = (10, 11, 9, 12, 10, 11), [12, 10, 13, 11, 12, 12]
    engine = Engine(make_decisive("vanilla"), max_batch_slots=4, max_seq_len=24, page_size=2, num_pages=60,
                    loop_prompt_tokens=loop, window=4)
    stats = engine.generate(prompts(lengths), new_tokens).stats
    assert stats.preemptions > 0
    assert stats.kv_block_ratio == pytest.approx(1.0) == stats.kv_model_ratio


def test_engine_stops_at_eos_and_caps_depth_like_generate():
    model = make_decisive("expert")
    free = Engine(model, max_batch_slots=3, max_seq_len=32).generate(prompts(), NEW_TOKENS)
    eos = free.results[1].tokens[3]
    out = Engine(model, max_batch_slots=3, max_seq_len=32).generate(prompts(), NEW_TOKENS, eos_token_id=eos)
    assert_matches_generate(model, out, prompts(), NEW_TOKENS, eos_token_id=eos)
    assert len(out.results[1].tokens) <= 4
    capped = Engine(model, max_batch_slots=3, max_seq_len=32, max_recursions=2).generate(prompts(), NEW_TOKENS)
    assert_matches_generate(model, capped, prompts(), NEW_TOKENS, max_recursions=2)
    assert max(capped.stats.depth_histogram) == 2


@pytest.mark.parametrize("variant", ["expert", "token_share", "recursive_cycle"])
def test_extra_recursions_in_the_engine_match_generate(variant):
    model = make_decisive(variant)
    out = Engine(model, max_batch_slots=3, max_seq_len=32, extra_recursions=2).generate(prompts(), NEW_TOKENS)
    assert_matches_generate(model, out, prompts(), NEW_TOKENS, extra_recursions=2)
    assert max(out.stats.depth_histogram) > model.config.num_recursions


def test_sampling_in_the_engine_is_seeded():
    engine = Engine(make_decisive("token"), max_batch_slots=3, max_seq_len=32)
    runs = [engine.generate(prompts(), 8, do_sample=True, top_p=0.9, seed=seed) for seed in (1, 1, 2)]
    tokens_of = [[r.tokens for r in run.results] for run in runs]
    assert tokens_of[0] == tokens_of[1] != tokens_of[2]
    for result in runs[0].results:
        assert result.time_to_first_token >= 0 and result.tokens_per_second > 0
        assert sum(result.depth_histogram.values()) == 8


def test_engine_rejects_bad_requests_clearly():
    engine = Engine(make_decisive("vanilla"), max_batch_slots=2, max_seq_len=16)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], 4)
    with pytest.raises(ValueError, match="prompt 0 .*at most 6 new tokens"):
        engine.generate([list(range(1, 11))], 8)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        engine.generate([[1, 999]], 2)
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        engine.generate([[1]], [2, 3])
    with pytest.raises(ValueError, match="top_k"):
        engine.generate([[1]], 2, do_sample=True, top_k=0)
    assert engine.generate([[1], [2]], [0, 3]).results[0].tokens == []
    with pytest.raises(ValueError, match="CUDA"):
        Engine(make_decisive("vanilla"), cuda_graphs=True)
    with pytest.raises(ValueError, match="loop_prompt_tokens must be at least 0, got -1"):
        Engine(make_decisive("vanilla"), loop_prompt_tokens=-1)


def test_a_requests_samples_depend_only_on_its_seed_not_on_its_batch_window_or_preemption():
    model = make_decisive("token")
    kwargs = dict(do_sample=True, temperature=1.3, seed=5)
    alone = Engine(model, max_batch_slots=1, max_seq_len=32, page_size=4).generate(prompts()[:1], [9], **kwargs)
    crowded = Engine(model, max_batch_slots=3, max_seq_len=32, page_size=4, window=1).generate(prompts(), 9, **kwargs)
    tight = Engine(model, max_batch_slots=4, max_seq_len=24, page_size=2, num_pages=40)
    squeezed = tight.generate(prompts(), 9, **kwargs)
    prefilled = Engine(model, max_batch_slots=3, max_seq_len=32, page_size=4, loop_prompt_tokens=0)
    assert squeezed.stats.preemptions > 0
    assert alone.results[0].tokens == crowded.results[0].tokens == squeezed.results[0].tokens
    assert [r.tokens for r in crowded.results] == [r.tokens for r in squeezed.results]
    assert [r.tokens for r in crowded.results] == [r.tokens for r in prefilled.generate(prompts(), 9, **kwargs).results]
    assert len({tuple(r.tokens) for r in crowded.results}) > 1


def test_streaming_requests_report_tokens_as_they_come_and_a_cancelled_one_frees_its_pages():
    model = make_decisive("expert")
    engine = Engine(model, max_batch_slots=3, max_seq_len=32, page_size=4, window=2)
    engine.prepare([], ("greedy",))
    ids = [engine.add(p, n) for p, n in zip(prompts(), NEW_TOKENS)]
    streamed: dict[int, list[int]] = {i: [] for i in ids}
    reasons: dict[int, str] = {}
    rounds = 0
    while engine.busy:
        for out in engine.step():
            streamed[out.request] += out.tokens
            if out.finish_reason:
                reasons[out.request] = out.finish_reason
        rounds += 1
        if rounds == 3:
            engine.cancel(ids[1])  # in flight by now
    assert rounds > 4, "tokens should arrive over several round trips"
    assert reasons == {i: "cancelled" if i == ids[1] else "length" for i in ids}
    for i, (prompt, count) in enumerate(zip(prompts(), NEW_TOKENS)):
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=count).sequences()[0]
        if i == 1:
            assert len(streamed[i]) < count and streamed[i] == reference[: len(streamed[i])]
        else:
            assert streamed[i] == reference
    assert engine.cache.pages_in_use() == 0


def test_a_request_cancelled_while_it_waits_for_a_row_is_dropped_at_once():
    engine = Engine(make_decisive("expert"), max_batch_slots=1, max_seq_len=32, page_size=4)
    engine.prepare([], ("greedy",))
    first, waiting = engine.add(prompts()[0], 6), engine.add(prompts()[1], 6)
    engine.step()  # the first takes the one row
    engine.cancel(waiting)
    reported = set()
    while engine.busy:
        reported |= {out.request for out in engine.step()}
    assert reported == {first}
    assert not engine._requests, "a dropped request must not stay behind (a server cancels many)"


def test_depth_wise_batching_can_be_switched_off_for_comparison():
    # Lockstep: the block holds a batch's tokens until the deepest is done; the tokens are the same, the block
    # runs emptier.
    model = make_decisive("expert")
    lengths = PROMPT_LENGTHS * 2
    runs = [Engine(model, max_batch_slots=4, max_seq_len=32, page_size=4, lockstep=lockstep).generate(
        prompts(lengths), 10) for lockstep in (False, True)]
    assert [r.tokens for r in runs[0].results] == [r.tokens for r in runs[1].results]
    assert runs[1].stats.block_occupancy < runs[0].stats.block_occupancy


def test_the_engine_routes_with_the_routers_as_they_are_including_a_bias():
    # Benchmarks calibrate exits by giving routers a bias; the engine's one-product router path must keep it.
    model = make_decisive("expert")
    router = model.model.expert.routers[1]  # decides on the second step
    linear = router.net
    router.net = torch.nn.Linear(linear.in_features, 1, bias=True)
    router.net.weight.data.copy_(linear.weight.data)
    router.net.bias.data.fill_(-1e4)  # every token stops after its first step
    out = Engine(model, max_batch_slots=3, max_seq_len=32, page_size=4).generate(prompts(), NEW_TOKENS)
    assert_matches_generate(model, out, prompts(), NEW_TOKENS)
    assert out.stats.depth_histogram == {1: sum(NEW_TOKENS)}


def test_each_request_can_have_its_own_test_time_depth():
    model = make_decisive("expert")
    engine = Engine(model, max_batch_slots=3, max_seq_len=32, page_size=4, extra_recursions=2)
    engine.prepare([], ("greedy",))
    depth = [dict(), dict(max_recursions=1), dict(extra_recursions=2), dict(max_recursions=2), dict(extra_recursions=1)]
    ids = [engine.add(p, n, **d) for p, n, d in zip(prompts(), NEW_TOKENS, depth)]
    streamed: dict[int, tuple[list[int], list[int]]] = {i: ([], []) for i in ids}
    while engine.busy:
        for out in engine.step():
            streamed[out.request][0].extend(out.tokens)
            streamed[out.request][1].extend(out.depths)
    for i, prompt, count, d in zip(ids, prompts(), NEW_TOKENS, depth):
        # The engine's default for a request that names neither is the engine's own: extra_recursions=2.
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=count, **(d or dict(extra_recursions=2)))
        assert streamed[i] == (reference.sequences()[0], reference.depths[0, :count].tolist())
    with pytest.raises(ValueError, match="at most 2"):
        engine.add([1], 2, extra_recursions=3)


def test_the_engine_serves_in_eval_mode():
    # Documented in Engine: it switches the model to inference routing and leaves it there.
    model = make_decisive("expert").train()
    Engine(model, max_batch_slots=2, max_seq_len=16, page_size=4)
    assert not model.training
