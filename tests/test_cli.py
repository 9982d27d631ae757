"""The ``mor`` command itself: one ``--set`` for every subcommand, ``--steps``, the shared ``--routing``, help without
heavy imports, and argument parsing kept to mor/cli/."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import CONFIGS, REPO_ROOT, CountingLM, make

from mor.cli import main
from mor.cli.common import routing_modes


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("sets", [["--set", "sharing=middle_cycle", "--set", "num_recursions=4"],
                                  ["--set", "sharing=middle_cycle", "num_recursions=4"]])
def test_info_takes_every_set_in_either_form(sets, capsys):
    code, out, _ = run(["info", "tiny-8l", *sets], capsys)
    assert code == 0 and "middle_cycle / 4" in out


def test_info_names_an_unknown_preset_or_a_broken_config_and_the_fix(tmp_path, capsys):
    presets = "smollm-135m, smollm-360m, smollm-730m, smollm-1.7b, tiny, tiny-8l, quickstart"
    code, _, err = run(["info", "smollm-36m"], capsys)
    assert code == 2 and err == (f"error: unknown preset 'smollm-36m' (did you mean smollm-360m?); choose one of "
                                 f"{presets}, or give a config.json\n")
    code, _, err = run(["info", str(tmp_path / "config.json")], capsys)
    assert code == 2 and err == (f"error: {tmp_path}/config.json does not exist; give a config.json, a checkpoint "
                                 f"folder or a preset ({presets})\n")
    (tmp_path / "config.json").write_text("vocab_size: 256\n")
    code, _, err = run(["info", str(tmp_path)], capsys)  # a checkpoint folder: its config.json
    assert code == 2 and err.startswith(f"error: {tmp_path}/config.json is not valid JSON (Expecting value at line 1, "
                                        "column 1); give the config.json of a mor checkpoint")


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> str:
    """The bundled corpus, prepared: a dry run checks the data as a real run would."""
    from mor.data import prepare_sample

    out = tmp_path_factory.mktemp("sample") / "data"
    prepare_sample(out, progress=False)
    return f"data.path={out}"


@pytest.mark.parametrize("sets", [["--set", "optim.lr=1e-4", "--set", "batch.micro_batch_size=2"],
                                  ["--set", "optim.lr=1e-4", "batch.micro_batch_size=2"]])
def test_train_takes_every_set_in_either_form(sets, sample_data, capsys):
    code, out, _ = run(["train", str(CONFIGS / "quickstart.yaml"), *sets, sample_data, "--dry-run"], capsys)
    assert code == 0 and "batch: 2 sequences" in out


def test_convert_uses_the_same_set(tmp_path, capsys):
    code, _, err = run(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "mor",
                        "--router", "expert", "--set", "capacities=[1.0,0.5,0.25]", "no_such_field=1"], capsys)
    assert code == 2 and "'no_such_field' is not a MoRConfig field" in err


@pytest.mark.parametrize("argv", [["train", "CONFIG", "--set", "optim.lr"],
                                  ["info", "--set", "sharing=cycle", "tiny"],
                                  ["convert", "a", "b", "--to", "mor", "--set", "x=[1,"]])
def test_a_bad_set_is_reported_under_the_subcommand_usage(argv, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.startswith(f"usage: mor {argv[0]} ") and f"mor {argv[0]}: error: --set: " in err


def test_steps_overrides_any_budget(sample_data, capsys):
    # configs/small/ budgets FLOPs; --steps replaces that (no need to null the FLOP budget first).
    code, out, _ = run(["train", str(CONFIGS / "small" / "vanilla.yaml"), "--steps", "5", "--set", sample_data,
                        "--dry-run"], capsys)
    assert code == 0 and "budget: 5 steps" in out
    code, _, err = run(["train", str(CONFIGS / "small" / "vanilla.yaml"), "--steps", "0"], capsys)
    assert code == 2 and "argument --steps: must be at least 1" in err


def test_routing_narrows_the_models_own_modes():
    assert routing_modes(make("vanilla"), "both") == [None]
    assert routing_modes(make("expert"), "both") == ["topk", "causal"]
    assert routing_modes(make("expert"), "causal") == ["causal"]
    assert routing_modes(make("token"), "causal") == [None]  # its forward is the same in both modes
    assert routing_modes(CountingLM(), "topk") == [None]  # not a mor model (mor eval --transformers)


def test_help_and_argument_errors_import_no_heavy_module():
    # `mor --help` paid seconds for torch before running anything; the time itself is measured by
    # benchmarks/cli_startup.py.
    script = """
import sys
from mor.cli import main
from mor.cli.common import routing_modes
for argv in (["--help"], ["train", "--help"], ["eval", "--help"], ["viz", "stats", "--help"], ["train", "x", "--set"],
             ["data", "prepare", "--help"], ["convert", "--help"], ["generate", "--help"], ["quickstart", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numpy", "tokenizers", "tqdm", "datasets", "matplotlib"}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "[]"


def test_only_the_command_line_parses_arguments():
    # The library packages take values, not argv: argparse belongs to mor/cli/ alone.
    package = REPO_ROOT / "src" / "mor"
    parsing = [str(path.relative_to(package)) for path in package.rglob("*.py")
               if re.search(r"^\s*(import|from) argparse\b", path.read_text(), re.M)]
    assert parsing and all(name.startswith("cli/") for name in parsing), parsing


@pytest.mark.slow
def test_quickstart_fresh_starts_over_in_a_folder_that_holds_a_run(tmp_path, capsys):
    argv = ["quickstart", "--steps", "1", "--max-new-tokens", "2", "--out", str(tmp_path), "--fresh"]
    for _ in range(2):  # the second run found the first one's run folder and refused it
        assert run(argv, capsys)[0] == 0
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000001"]
