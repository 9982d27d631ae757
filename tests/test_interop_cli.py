"""``mor convert``: the written checkpoints are what the library functions produce, tokenizers travel along."""

import json

import pytest
import torch

from mor import MoRConfig, MoRForCausalLM
from mor.cli import main
from mor.interop import load_hf_llama, to_recursive

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Hugging Face Llama folder with a tokenizer.json beside the weights."""
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"stand-in": true}')
    return folder


def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def test_convert_to_mor_router_matches_to_recursive(llama_dir, tmp_path, capsys):
    out = tmp_path / "mor"
    assert main(["convert", str(llama_dir), str(out), "--to", "mor", "--router", "expert", "--num-recursions", "2",
                 "--init", "upper", "--seed", "4", "--set", "capacities=[1.0, 0.5]"]) == 0
    assert "original layers 4, 5, 6" in capsys.readouterr().out
    written = MoRForCausalLM.from_pretrained(out).eval()
    expected = to_recursive(load_hf_llama(llama_dir), "middle_cycle", 2, "upper", router="expert", seed=4,
                            capacities=[1.0, 0.5]).eval()
    assert written.config == expected.config
    for (name, a), b in zip(written.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), name
    assert (out / "tokenizer.json").read_text() == '{"stand-in": true}'


def test_convert_recursive_then_export_to_hf(llama_dir, tmp_path):
    rec, hf_dir = tmp_path / "rec", tmp_path / "hf"
    assert main(["convert", str(llama_dir), str(rec), "--to", "recursive", "--init", "average"]) == 0
    recursive = MoRForCausalLM.from_pretrained(rec).eval()
    assert (recursive.config.sharing, recursive.config.num_recursions) == ("middle_cycle", 3)
    assert main(["convert", str(rec), str(hf_dir), "--to", "hf", "--dtype", "float32"]) == 0
    assert json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"] == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids()).logits, recursive(ids()).logits, rtol=1e-5, atol=1e-5)
    assert (hf_dir / "tokenizer.json").is_file()


def test_convert_vanilla_import_with_dtype_and_tokenizer_option(llama_dir, tmp_path):
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    tokenizer.parent.mkdir()
    tokenizer.write_text('{"other": 1}')
    out = tmp_path / "vanilla"
    assert main(["convert", str(llama_dir), str(out), "--to", "mor", "--dtype", "bfloat16",
                 "--tokenizer", str(tokenizer)]) == 0
    from safetensors.torch import load_file

    assert MoRForCausalLM.from_pretrained(out).config.sharing == "none"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert (out / "tokenizer.json").read_text() == '{"other": 1}'


@pytest.mark.parametrize("extra, message", [
    (["--to", "hf", "--sharing", "cycle"], "--to hf writes the source model as it is"),
    (["--to", "recursive", "--router", "expert"], "--to recursive makes a model without routers"),
    (["--to", "mor", "--set", "kv_cache=share"], "add --sharing or --router"),
    (["--to", "mor", "--sharing", "cycle", "--set", "colour=1"], "'colour' is not a MoRConfig field"),
    (["--to", "mor", "--tokenizer", "/nonexistent/tok"], "does not exist"),
])
def test_convert_reports_bad_arguments(llama_dir, tmp_path, capsys, extra, message):
    assert main(["convert", str(llama_dir), str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_convert_refuses_router_models_to_hf_and_existing_output(tmp_path, capsys):
    model = MoRForCausalLM(MoRConfig.from_preset("tiny", sharing="middle_cycle", num_recursions=3, router="token"))
    model.save_pretrained(tmp_path / "mor")
    assert main(["convert", str(tmp_path / "mor"), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "no Mixture-of-Recursions architecture" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "mor"), str(tmp_path / "mor"), "--to", "mor"]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_convert_names_a_broken_config_json(llama_dir, tmp_path, capsys):
    import shutil

    source = tmp_path / "llama"
    shutil.copytree(llama_dir, source)
    (source / "config.json").write_text('{"model_type": "llama",')
    assert main(["convert", str(source), str(tmp_path / "out"), "--to", "mor"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {source}/config.json is not valid JSON (Expecting property name enclosed in double quotes "
                   "at line 1, column 24); give a checkpoint folder with an intact config.json (Hugging Face Llama "
                   "or mor) or a .gguf file\n")
