import re

import pytest
import torch

from mor import MoRConfig, MoRForCausalLM
from mor.cli import main
from mor.infer.streaming import depth_colour

ANSI = re.compile(r"\033\[[0-9;]*m")


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny expert-choice checkpoint with a byte-level tokenizer (id 0 = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}},
                                     merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    torch.manual_seed(0)
    config = MoRConfig.from_preset("tiny", vocab_size=320, initializer_range=0.2, sharing="middle_cycle",
                                   num_recursions=3, router="expert")
    model = MoRForCausalLM(config)
    for router in model.model.expert.routers:
        router.net.weight.data.mul_(10)
    model.save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path, model.eval(), tokenizer


def test_generate_streams_the_greedy_continuation_coloured_by_depth(checkpoint, capsys):
    path, model, tokenizer = checkpoint
    assert main(["generate", str(path), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0",
                 "--color-depth"]) == 0
    out, err = capsys.readouterr()
    prompt = tokenizer.encode("Hello").ids
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, eos_token_id=0)
    ids = expected.sequences()[0]
    text = tokenizer.decode([i for i in ids if i != 0])
    assert ANSI.sub("", out) == "Hello" + text + "\n"
    used = {int(d) for d in expected.depths[0, :len(ids)]}
    assert set(re.findall(r"\033\[48;2;[\d;]+m\033\[38;2;[\d;]+m", out)) == {depth_colour(d, 3) for d in used}
    assert f"{len(ids)} tokens" in err and "mean depth" in err


def test_generate_samples_repeatably_from_an_empty_prompt(checkpoint, capsys):
    path, _, _ = checkpoint
    runs = []
    for _ in range(2):
        assert main(["generate", str(path), "--max-new-tokens", "8", "--seed", "3", "--top-k", "20"]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and "\033[" not in runs[0]


def test_generate_reports_bad_input_clearly(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    assert main(["generate", str(path), "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    (path / "tokenizer.json").unlink()
    assert main(["generate", str(path)]) == 2
    assert "--tokenizer" in capsys.readouterr().err
