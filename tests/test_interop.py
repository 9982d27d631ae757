"""Hugging Face Llama / GGUF import, export and Auto-class loading: logits must match exactly (fp32)."""

import json
import os

import pytest
import torch
from helpers import VOCAB, make, tokens, uneven_norms

from mor import MoRForCausalLM
from mor.interop import UnsupportedCheckpointError, export_hf, load_hf_llama, to_recursive

transformers = pytest.importorskip("transformers")

ROPE_THETA = 5000.0


def tiny_llama(tie: bool = True, **overrides) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=ROPE_THETA,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=3, eos_token_id=[4, 5], pad_token_id=6)
    return uneven_norms(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, **overrides})).eval())


def assert_same_logits(ours: MoRForCausalLM, theirs, ids: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, theirs.eval()(ids).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("shard", [False, True])
def test_import_safetensors_gives_identical_logits(tmp_path, tie, shard):
    hf = tiny_llama(tie)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "1GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard
    model = load_hf_llama(tmp_path)
    cfg = model.config
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (5000.0, 1e-5, tie)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (3, 4, 6)
    assert cfg.sharing == "none" and cfg.num_hidden_layers == 5
    assert_same_logits(model, hf, tokens(2, 20))


def test_import_pytorch_bin(tmp_path):
    hf = tiny_llama(tie=False)
    state = {k: v for k, v in hf.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    assert_same_logits(load_hf_llama(tmp_path), hf, tokens(2, 20))


def test_import_refuses_an_unsafe_pytorch_bin(tmp_path):
    class Payload:  # unpickling it would run a shell command
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    hf = tiny_llama()
    torch.save({**hf.state_dict(), "extra": Payload()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    with pytest.raises(ValueError, match="pytorch_model.bin is not a safe checkpoint") as error:
        load_hf_llama(tmp_path)
    assert "weights_only" not in str(error.value) and not (tmp_path / "pwned").exists()


def test_import_casts_to_requested_dtype(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    model = load_hf_llama(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _write_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("changes, field", [
    (dict(model_type="mistral"), "model_type"),
    (dict(architectures=["LlamaForSequenceClassification"]), "architectures"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=32), "head_dim"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_parameters"),
    (dict(rope_parameters=None, rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
])
def test_import_refuses_unsupported_configs_naming_the_field(tmp_path, changes, field):
    tiny_llama().save_pretrained(tmp_path)
    _write_config(tmp_path, **changes)
    with pytest.raises(UnsupportedCheckpointError, match=f"'{field}'"):
        load_hf_llama(tmp_path)


def test_import_refuses_a_config_without_a_required_field(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedCheckpointError, match="'hidden_size': missing"):
        load_hf_llama(tmp_path)


def test_import_reads_transformers4_rope_theta(tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path)
    _write_config(tmp_path, rope_parameters=None, rope_theta=5000.0, rope_scaling=None)
    model = load_hf_llama(tmp_path)
    assert model.config.rope_theta == 5000.0
    assert_same_logits(model, hf, tokens(2, 20))


def test_import_refuses_missing_weights_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a .gguf"):
        load_hf_llama(tmp_path / "absent")
    tiny_llama().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        load_hf_llama(tmp_path)


def test_import_refuses_weights_that_do_not_match_the_config(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_llama().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    del state["model.layers.4.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match=r"missing \['model.layers.4.mlp.up_proj.weight'\].*"
                                                         r"unexpected \['model.layers.0.self_attn.q_proj.bias'\]"):
        load_hf_llama(tmp_path)


# ---------------------------------------------------------------------------------------------- GGUF
def _permute_for_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k projections (interleaved rotary pairs), which readers undo."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(hf, path) -> None:
    """A float32 llama GGUF of ``hf`` with the gguf package's writer."""
    gguf = pytest.importorskip("gguf")
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, value in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if "q_proj" in name:
            value = _permute_for_gguf(value, cfg.num_attention_heads)
        elif "k_proj" in name:
            value = _permute_for_gguf(value, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), value.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tie", [True, False])
def test_import_gguf_gives_identical_logits(tmp_path, tie):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate", reason="transformers reads GGUF only with accelerate installed")
    hf = tiny_llama(tie, eos_token_id=4)
    write_gguf(hf, tmp_path / "tiny.gguf")
    model = load_hf_llama(tmp_path / "tiny.gguf")
    assert model.config.tie_word_embeddings == tie
    assert model.config.rope_theta == 5000.0
    assert_same_logits(model, hf, tokens(2, 20))
    # A folder with one .gguf and no config.json is read the same way.
    assert_same_logits(load_hf_llama(tmp_path), hf, tokens(2, 20))


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("overrides", [
    {},
    dict(tie_word_embeddings=False),
    dict(sharing="middle_cycle", num_recursions=3),
    dict(sharing="cycle", num_recursions=2),
    dict(sharing="sequence", num_recursions=2),
    dict(sharing="middle_sequence", num_recursions=2),
], ids=["vanilla", "untied", "middle_cycle", "cycle", "sequence", "middle_sequence"])
def test_export_loads_in_transformers_as_llama_with_identical_logits(tmp_path, overrides):
    model = make(**overrides)
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_hidden_layers == model.config.num_effective_layers
    assert_same_logits(model, hf, tokens(2, 20))
    # And back: the unrolled export imports as a vanilla model with the same logits.
    assert_same_logits(load_hf_llama(tmp_path), hf, tokens(2, 20))


def test_export_refuses_routers_and_shared_kv(tmp_path):
    with pytest.raises(UnsupportedCheckpointError, match="no Mixture-of-Recursions architecture.*register_auto_classes"):
        export_hf(make(sharing="middle_cycle", num_recursions=3, router="expert"), tmp_path)
    with pytest.raises(UnsupportedCheckpointError, match="kv_cache='share'"):
        export_hf(make(sharing="middle_cycle", num_recursions=3, kv_cache="share"), tmp_path)


# ---------------------------------------------------------------------------------------------- Auto classes
@pytest.mark.parametrize("overrides", [
    {},
    dict(sharing="middle_cycle", num_recursions=3, router="expert"),
    dict(sharing="middle_cycle", num_recursions=3, router="token", tie_word_embeddings=False),
], ids=["vanilla", "expert", "token_untied"])
def test_auto_model_loads_mor_checkpoints(tmp_path, overrides):
    from mor.interop import register_auto_classes

    register_auto_classes()
    model = make(**overrides)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not hf.training
    assert_same_logits(model, hf, tokens(2, 20))
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == model.config.tie_word_embeddings
    # The wrapper writes our format again.
    hf.save_pretrained(tmp_path / "again")
    assert_same_logits(MoRForCausalLM.from_pretrained(tmp_path / "again"), hf, tokens(2, 20))
    # Training mode reaches the core (top-k routing, gradients).
    hf.train()
    out = hf(tokens(2, 20), labels=tokens(2, 20))
    out.loss.backward()
    assert hf.model.embed_tokens.weight.grad is not None


def test_converted_mor_model_runs_through_auto_classes(tmp_path):
    from mor.interop import register_auto_classes

    register_auto_classes()
    hf = tiny_llama()
    hf.save_pretrained(tmp_path / "llama")
    mor_model = to_recursive(load_hf_llama(tmp_path / "llama"), "middle_cycle", 2, "upper", router="expert")
    mor_model.save_pretrained(tmp_path / "mor")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mor")
    assert_same_logits(mor_model, loaded, tokens(2, 20))
