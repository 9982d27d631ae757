import pytest
import torch
from helpers import ROUTED_VARIANTS, VARIANTS, VOCAB, make, scale_routers, tokens
from safetensors.torch import load_file, save_file

from mor import MoRConfig, MoRForCausalLM
from mor.model.sharing import layer_plan


# ---------------------------------------------------------------------------------------------- references
def test_vanilla_matches_transformers_llama():
    transformers = pytest.importorskip("transformers")
    model = make()
    cfg = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=True,
        attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)
        # Left padding: real tokens numbered from 0, padding masked out.
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        ours = model(ids, attention_mask=mask).logits
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
        torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle_cycle", "middle_sequence"])
def test_recursive_equals_unrolled_vanilla_with_copied_weights(sharing):
    recursive = make(sharing=sharing, num_recursions=3)
    unrolled_cfg = MoRConfig.from_preset("tiny", num_hidden_layers=recursive.config.num_effective_layers)
    vanilla = MoRForCausalLM(unrolled_cfg).eval()
    plan = layer_plan(recursive.config)
    state = {k: v for k, v in recursive.state_dict().items() if not k.startswith("model.layers.")}
    for position, layer in enumerate(plan.layer_of):
        for name, value in recursive.model.layers[layer].state_dict().items():
            state[f"model.layers.{position}.{name}"] = value.clone()
    vanilla.load_state_dict(state, strict=True)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(recursive(ids).logits, vanilla(ids).logits)


def _manual_recursion(model: MoRForCausalLM, ids: torch.Tensor, combine) -> torch.Tensor:
    """Run the model's layers by hand on every token at every step, combining step outputs with ``combine``."""
    m = model.model
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    rope = m.rotary(positions, torch.float32)
    h = m.embed_tokens(ids)
    for p in m.plan.prelude:
        h, _ = m.unrolled_layer(p)(h, rope, None)
    first = h
    for r, step in enumerate(m.plan.steps, start=1):
        out = h
        for p in step:
            out, _ = m.unrolled_layer(p)(out, rope, None)
        h = combine(r, first, h, out)
    for p in m.plan.coda:
        h, _ = m.unrolled_layer(p)(h, rope, None)
    return model.lm_head(m.norm(h))


def test_expert_choice_selecting_every_token_reduces_to_the_recursive_computation():
    model = make(sharing="middle_cycle", num_recursions=3, router="expert", capacities=[1.0, 1.0, 1.0])
    for router in model.model.expert.routers:
        torch.nn.init.zeros_(router.net.weight)  # gate = alpha * sigmoid(0) for every token
    gate = 0.1 * 0.5
    ids = tokens()
    with torch.no_grad():
        out = model(ids, routing="topk")
        assert (out.depths == 3).all()
        expected = _manual_recursion(model, ids, lambda r, first, h, f: h + gate * f)
        torch.testing.assert_close(out.logits, expected)


@pytest.mark.parametrize("gating", ["exit", "every"])
def test_token_choice_at_full_depth_reduces_to_the_recursive_computation(gating):
    model = make(sharing="middle_cycle", num_recursions=3, router="token", balancing="loss_free",
                 token_gating=gating)
    torch.nn.init.zeros_(model.model.token.router.net.weight)  # uniform probabilities 1/3
    model.model.token.balancing_bias.copy_(torch.tensor([0.0, 0.0, 1.0]))  # every token takes depth 3
    g = 1 / 3

    def combine(r, first, h, f):
        if r == 3:
            return first + g * f
        return f if gating == "exit" else g * f

    ids = tokens()
    with torch.no_grad():
        out = model(ids)
        assert (out.depths == 3).all()
        torch.testing.assert_close(out.logits, _manual_recursion(model, ids, combine))


# ---------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("nr, seq_len, expected", [(3, 24, [24, 16, 8]), (4, 30, [30, 22, 15, 7]), (2, 9, [9, 4])])
def test_expert_choice_selects_floor_capacity_times_length_per_sequence(nr, seq_len, expected):
    model = make(sharing="middle_cycle", num_recursions=nr, router="expert", num_hidden_layers=2 + nr)
    out = model(tokens(3, seq_len), routing="topk")
    for r, count in enumerate(expected, start=1):
        assert ((out.depths >= r).sum(1) == count).all(), (r, out.depths)


def test_capacity_warm_up_follows_the_training_progress_it_is_given():
    model = make("expert", capacity_warmup_steps=10).train()
    ids = tokens(2, 24)
    for progress, expected in ((0, [24, 24, 24]), (5, [24, 20, 16]), (10, [24, 16, 8]), (None, [24, 16, 8])):
        model.set_training_progress(progress)
        for _ in range(2):  # forwards leave the progress alone: the training loop owns it
            depths = model(ids).depths
            assert [int((depths >= r).sum(1)[0]) for r in (1, 2, 3)] == expected, progress


def test_expert_choice_is_hierarchical_and_follows_router_scores():
    model = make(sharing="middle_cycle", num_recursions=3, router="expert")
    ids = tokens(1, 24)
    with torch.no_grad():
        out = model(ids, routing="topk")
        # Scores of the second router over all tokens: the 16 selected must be the 16 highest.
        m = model.model
        h = m.embed_tokens(ids)
        rope = m.rotary(torch.arange(24)[None], torch.float32)
        h, _ = m.unrolled_layer(0)(h, rope, None)
        step1 = h
        for p in m.plan.steps[0]:
            step1, _ = m.unrolled_layer(p)(step1, rope, None)
        gate1 = m.expert.gate(m.expert.logits(0, h))
        h = h + gate1[..., None] * step1
        scores = m.expert.logits(1, h)[0]
    chosen = set(scores.topk(16).indices.tolist())
    assert chosen == set((out.depths[0] >= 2).nonzero().flatten().tolist())
    assert ((out.depths[0] >= 3) <= (out.depths[0] >= 2)).all()


def test_padding_rows_route_on_their_real_tokens_only():
    model = make(sharing="middle_cycle", num_recursions=3, router="expert")
    ids = tokens(2, 24)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding: 18 real tokens
    mask[1, 20:] = 0  # right padding: 20 real tokens
    out = model(ids, attention_mask=mask, routing="topk")
    assert (out.depths[mask == 0] == 0).all()
    assert (out.depths >= 2).sum(1).tolist() == [12, 13]
    assert (out.depths >= 3).sum(1).tolist() == [6, 6]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_run_alone(variant, side):
    model = make(variant)
    long, short = tokens(1, 20, seed=2), tokens(1, 13, seed=3)
    pad = torch.zeros(1, 7, dtype=torch.long)
    padded = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
    mask = torch.cat([torch.zeros_like(pad), torch.ones_like(short)], 1) if side == "left" else \
        torch.cat([torch.ones_like(short), torch.zeros_like(pad)], 1)
    batch = torch.cat([long, padded])
    batch_mask = torch.cat([torch.ones_like(long), mask])
    for routing in ("topk", "causal"):
        with torch.no_grad():
            together = model(batch, attention_mask=batch_mask, routing=routing)
            alone_long = model(long, routing=routing)
            alone_short = model(short, routing=routing)
        torch.testing.assert_close(together.logits[0], alone_long.logits[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together.logits[1][mask[0].bool()], alone_short.logits[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(together.depths[1][mask[0].bool()], alone_short.depths[0])


@pytest.mark.parametrize("variant", ROUTED_VARIANTS + ["vanilla", "recursive_middle_cycle_share"])
def test_causal_mode_never_looks_ahead(variant):
    model = make(variant)
    ids = tokens(2, 24)
    scale_routers(model, 40)  # decisive routers: the threshold splits tokens at every step
    with torch.no_grad():
        base = model(ids, routing="causal")
        depths = base.depths
        if model.model.expert is not None:
            assert len(set(depths.flatten().tolist())) > 1, "routing should split tokens in this test"
        for t in (5, 12, 20):
            changed = ids.clone()
            changed[:, t + 1:] = torch.randint(0, VOCAB, changed[:, t + 1:].shape)
            out = model(changed, routing="causal")
            torch.testing.assert_close(out.logits[:, : t + 1], base.logits[:, : t + 1], rtol=0, atol=1e-6)
            assert torch.equal(out.depths[:, : t + 1], depths[:, : t + 1])


def test_topk_mode_does_look_ahead():
    # The contrast that makes the causal test meaningful: per-sequence top-k depends on later tokens.
    model = make("expert")
    for router in model.model.expert.routers:
        router.net.weight.data.mul_(40)
    ids = tokens(4, 24)
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, VOCAB, changed[:, 12:].shape)
    with torch.no_grad():
        a, b = model(ids, routing="topk"), model(changed, routing="topk")
    assert not torch.equal(a.depths[:, :12], b.depths[:, :12])


def test_eval_defaults_to_causal_and_train_to_topk():
    model = make("expert")
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, model(ids, routing="causal").logits)
        model.train()
        torch.testing.assert_close(model(ids).logits, model(ids, routing="topk").logits)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_routing_modes_are_the_modes_whose_forward_differs(variant):
    # MoRConfig.routing_modes: what evaluation (mor eval, mor viz, training validation) runs a model in.
    model = make(variant)
    ids = tokens(4, 24)
    with torch.no_grad():
        topk, causal = model(ids, routing="topk"), model(ids, routing="causal")
    differ = not torch.equal(topk.depths, causal.depths) or not torch.equal(topk.logits, causal.logits)
    assert model.config.routing_modes == (("topk", "causal") if differ else (None,))


@pytest.mark.parametrize("variant", ROUTED_VARIANTS)
def test_training_gradients_reach_every_router_and_shared_weight(variant):
    model = make(variant).train()
    ids = tokens(2, 24)
    out = model(ids, labels=ids)
    out.loss.backward()
    for name, p in model.named_parameters():
        if name == "lm_head.weight":
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_aux_router_is_trained_only_by_its_own_loss():
    model = make("expert_aux_router").train()
    ids = tokens(2, 24)
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"aux_router_bce"}
    out.aux_losses["aux_router_bce"].backward()
    aux = {id(p) for p in model.aux_router_parameters()}
    assert aux
    for p in model.parameters():
        touched = p.grad is not None and p.grad.abs().sum() > 0
        assert touched == (id(p) in aux)


def test_auxiliary_losses_and_coefficients():
    model = make("expert", z_loss_coeff=0.01).train()
    ids = tokens()
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"router_bce", "router_z"}
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_losses["router_bce"] + out.aux_losses["router_z"])
    # BCE targets: step 1 selects every token, so its BCE is -log sigmoid(logit) averaged over tokens.
    single = make(sharing="middle_cycle", num_recursions=2, router="expert", capacities=[1.0, 1.0],
                  aux_loss_coeff=1.0).train()
    out = single(ids, labels=ids)
    assert out.aux_losses["router_bce"] > 0
    token = make("token", z_loss_coeff=0.001).train()
    out = token(ids, labels=ids)
    assert set(out.aux_losses) == {"balancing", "router_z"}
    load = out.router_stats["load"]
    assert load.sum().item() == pytest.approx(1.0)


def test_loss_free_balancing_bias_moves_towards_balance():
    model = make("token", balancing="loss_free", balancing_bias_rate=0.01).train()
    ids = tokens(4, 24)
    out = model(ids)
    load = out.router_stats["load"]
    model.update_balancing_bias()
    bias = model.model.token.balancing_bias
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(bias, expected)
    assert model.model.token.load_counts.sum() == 0
    assert "balancing" not in out.aux_losses


def test_max_recursions_caps_depth_and_extra_steps_are_skipped():
    model = make("expert")
    ids = tokens()
    with torch.no_grad():
        capped = model(ids, max_recursions=1, routing="topk")
    assert capped.depths.max() == 1
    with pytest.raises(ValueError, match="max_recursions"):
        model(ids, max_recursions=0)


def test_document_ids_block_attention_across_documents():
    model = make()
    ids = tokens(1, 20)
    docs = torch.tensor([[0] * 8 + [1] * 12])
    with torch.no_grad():
        packed = model(ids, document_ids=docs).logits
        second_alone = model(ids[:, 8:]).logits
    # RoPE is relative, so the second document alone gives the same logits as inside the packed row.
    torch.testing.assert_close(packed[:, 8:], second_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, :8], model(ids[:, :8]).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("variant", ["recursive_middle_cycle_share", "expert", "token"])
def test_every_shared_weight_is_tied_by_storage(variant):
    model = make(variant)
    plan = model.model.plan
    groups: dict[int, list[int]] = {}
    for position, layer in enumerate(plan.layer_of):
        groups.setdefault(layer, []).append(position)
    shared = [positions for positions in groups.values() if len(positions) > 1]
    assert len(shared) == model.config.recursion_block_size
    for positions in shared:
        first = dict(model.model.unrolled_layer(positions[0]).named_parameters())
        assert {n.split(".")[0] for n in first} == {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
        for position in positions[1:]:
            for name, p in model.model.unrolled_layer(position).named_parameters():
                assert p.data_ptr() == first[name].data_ptr(), (position, name)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_kv_sharing_skips_key_value_projections_after_the_first_recursion():
    model = make("recursive_middle_cycle_share")
    calls = []
    for layer in model.model.layers:
        layer.self_attn.k_proj.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(tokens())
    # first + last unique layers and the block's first application only: 2 + B projections.
    assert len(calls) == 2 + model.config.recursion_block_size


def test_save_load_round_trip(tmp_path):
    model = make("token", balancing="loss_free")
    model.model.token.balancing_bias.fill_(0.25)
    model.save_pretrained(tmp_path)
    loaded = MoRForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert loaded.model.token.balancing_bias.eq(0.25).all()


def test_checkpoints_with_the_retired_warm_up_count_still_load(tmp_path):
    # Earlier versions kept the capacity warm-up count in the model (a buffer); the trainer keeps it now.
    model = make("expert")
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file({**state, "model.expert.num_training_forwards": torch.tensor(7)}, tmp_path / "model.safetensors")
    loaded = MoRForCausalLM.from_pretrained(tmp_path).eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_from_pretrained_refuses_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MoRForCausalLM.from_pretrained(tmp_path)
    make().save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        MoRForCausalLM.from_pretrained(tmp_path / "a")
    make().save_pretrained(tmp_path / "b")
    MoRConfig.from_preset("tiny", hidden_size=32).save(tmp_path / "b" / "config.json")
    with pytest.raises(ValueError, match="shape mismatch"):
        MoRForCausalLM.from_pretrained(tmp_path / "b")
    make(sharing="middle_cycle", num_recursions=2).save_pretrained(tmp_path / "c")
    make().config.save(tmp_path / "c" / "config.json")
    with pytest.raises(ValueError, match="missing"):
        MoRForCausalLM.from_pretrained(tmp_path / "c")


def test_bad_inputs_raise_clear_errors():
    model = make()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="routing"):
        model(tokens(), routing="greedy")
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        model(torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("variant", ["vanilla", "expert", "expert_share", "token", "token_share"])
def test_a_training_forward_traces_as_one_graph_once_compiled(variant):
    """``MoRForCausalLM.compile`` turns on the tracing of token-choice's data-dependent token count as a size, so
    no variant breaks the graph (``.item()`` used to break it at every recursion step)."""
    with torch._dynamo.config.patch(capture_scalar_outputs=False):  # restored after the test
        model = make(variant).train()
        model.compile()
        assert torch._dynamo.config.capture_scalar_outputs
        ids = tokens(2, 32)
        explained = torch._dynamo.explain(model.forward)(ids, labels=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("variant", ["vanilla", "expert", "token_share"])
def test_a_loss_without_logits_is_the_same_loss_with_the_same_gradients(variant):
    model = make(variant).train()
    ids = tokens(2, 24)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    outs, grads = [], []
    for return_logits in (True, False):
        model.zero_grad()
        torch.manual_seed(0)
        out = model(ids, labels=ids, attention_mask=mask, return_logits=return_logits)
        out.loss.backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    full, chunked = outs
    assert chunked.logits is None and full.logits is not None
    torch.testing.assert_close(chunked.lm_loss, full.lm_loss)
    torch.testing.assert_close(chunked.loss, full.loss)
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_regional_compilation_compiles_one_layer_and_trains_like_eager():
    variant = "expert"
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = make(variant, num_hidden_layers=6).train()
    model = make(variant, num_hidden_layers=6).train()
    model.compile_regions()
    ids = tokens(2, 32)
    for return_logits in (True, False):
        out = model(ids, labels=ids, return_logits=return_logits)
        ref = eager(ids, labels=ids)
        torch.testing.assert_close(out.loss, ref.loss)
        out.loss.backward()
        ref.loss.backward()
    for p, q in zip(model.parameters(), eager.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    # Six layers, two compiled layer graphs (causal for every token, masked for the gathered ones), plus the
    # loss with and without logits.
    assert counters["stats"]["unique_graphs"] == 2 + 2
    assert torch._dynamo.config.recompile_limit >= 32  # room for every form a layer meets in training and eval
