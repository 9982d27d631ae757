"""Every user error of the ``mor`` command is one line on stderr that names the problem and the fix; a traceback
only with ``--debug`` or ``MOR_DEBUG=1``. docs/reliability.md lists the cases."""

from __future__ import annotations

import errno
import importlib
import os
import pickle
import shutil
import sys

import pytest
import yaml
from helpers import make_dataset, tiny_config

from mor.cli import main
from mor.data import prepare
from mor.errors import describe, exit_status, split_debug_flag
from mor.train import train
from mor.train.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A prepared dataset, a finished run with checkpoints, its config file, other data and a stray file."""
    root = tmp_path_factory.mktemp("cli-errors")
    data = make_dataset(root)
    config = tiny_config(data, root / "run", budget={"steps": 2}, run={"save_every": 1})
    train(config)
    (root / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    prepare([root / "corpus.jsonl"], root / "tokenizer.json", root / "other-data", val_fraction=0.2, progress=False)
    (root / "afile").write_text("a file, not a folder")
    (root / "broken.yaml").write_text("model:\n  preset: tiny\n  capacities: [1.0, 0.5\ndata: {}\n")
    (root / "empty").mkdir()
    shutil.copytree(data, root / "no-shard")
    (root / "no-shard" / "train-00000.bin").unlink()
    shutil.copytree(data, root / "corrupt")
    shard = root / "corrupt" / "train-00000.bin"
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    shutil.copytree(latest_checkpoint(root / "run"), root / "broken-config")
    (root / "broken-config" / "config.json").write_text("{")
    shutil.copytree(latest_checkpoint(root / "run"), root / "tampered")
    weights = root / "tampered" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\x07" * 64)
    return root


# (arguments with {root} for the workspace, text the one line must hold, exit status)
CASES = {
    "lr-beyond-float32": (["train", "{root}/config.yaml", "--set", "optim.lr=1e39"], "beyond float32", 2),
    "dry-run-seq-len-past-context": (["train", "{root}/config.yaml", "--dry-run", "--set", "data.seq_len=1024"],
                                     "data.seq_len: 1024 exceeds model.max_position_embeddings 256", 2),
    "dry-run-vocab-too-small": (["train", "{root}/config.yaml", "--dry-run", "--set", "model.vocab_size=256"],
                                "set model.vocab_size to at least 300", 2),
    "dry-run-missing-data": (["train", "{root}/config.yaml", "--dry-run", "--set", "data.path={root}/nowhere"],
                             "nowhere is not a prepared token folder", 2),
    "train-broken-yaml": (["train", "{root}/broken.yaml"],
                          "error: {root}/broken.yaml: not valid YAML: while parsing a flow sequence at line 3, column "
                          "15: expected ',' or ']', but got ':' at line 4, column 5; correct the YAML at line 4, "
                          "column 5", 2),
    "dry-run-run-dir-under-a-file": (["train", "{root}/config.yaml", "--dry-run", "--set",
                                      "run.out_dir={root}/afile/run"],
                                     "run.out_dir: {root}/afile/run lies under {root}/afile, which is a file; choose "
                                     "another path", 2),
    "run-dir-under-a-file": (["train", "{root}/config.yaml", "--set", "run.out_dir={root}/afile/run"],
                             "run.out_dir: cannot write to {root}/afile/run (a part of the path is a file", 2),
    "resume-with-other-data": (["train", "{root}/config.yaml", "--resume", "--set", "data.path={root}/other-data"],
                               "was trained on other data than data.path {root}/other-data holds", 2),
    "eval-seq-len-past-context": (["eval", "{root}/tampered", "--no-verify", "--perplexity", "{root}/corpus.jsonl",
                                   "--seq-len", "4096"], "--seq-len 4096 exceeds the model's context", 2),
    "eval-out-under-a-file": (["eval", "{root}/tampered", "--perplexity", "{root}/corpus.jsonl", "--out",
                               "{root}/afile/x.json"], "--out: {root}/afile is a file, not a folder", 2),
    "eval-empty-folder": (["eval", "{root}/empty", "--tasks", "copa"],
                          "{root}/empty is not a mor checkpoint (no config.json)", 2),
    "eval-broken-config": (["eval", "{root}/broken-config", "--no-verify", "--tasks", "copa"],
                           "{root}/broken-config/config.json is not valid JSON (Expecting property name enclosed in "
                           "double quotes at line 1, column 2); give the config.json of a mor checkpoint", 2),
    "eval-tampered-weights": (["eval", "{root}/tampered", "--perplexity", "{root}/corpus.jsonl"],
                              "model.safetensors does not match its checksum", 2),
    "generate-tampered-weights": (["generate", "{root}/tampered"], "does not match its checksum", 2),
    "verify-missing-shard": (["data", "inspect", "{root}/no-shard", "--verify"],
                             "verify: 1 file(s) differ from the index: train-00000.bin (missing)", 1),
    "show-corrupt-shard": (["data", "inspect", "{root}/corrupt", "--show", "5"],
                           "train-00000.bin holds token id 65535 at position 0", 2),
    "prepare-out-is-a-file": (["data", "prepare", "{root}/corpus.jsonl", "--tokenizer", "{root}/tokenizer.json",
                               "--out", "{root}/afile"], "output folder: {root}/afile is a file, not a folder", 2),
    "prepare-other-inputs": (["data", "prepare", "{root}/corpus.jsonl", "--tokenizer", "{root}/tokenizer.json",
                              "--out", "{root}/other-data"], "pass --overwrite", 2),
    "sample-into-other-data": (["data", "sample", "--out", "{root}/other-data"], "pass --overwrite", 2),
}


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line(workspace, capsys, case):
    argv, expected, status = CASES[case]
    assert main([arg.format(root=workspace) for arg in argv]) == status
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) <= 1, err
    assert all(line.startswith("error: ") for line in lines), err  # one prefix, whatever the command
    # The problem is reported on stderr; `inspect --verify` reports its finding on stdout.
    assert expected.format(root=workspace) in (lines[0] if lines else out.splitlines()[-1]), err


@pytest.mark.parametrize("argv, expected", [
    (["data", "inspect", "{root}/run", "--show", "-5"], "--show: must be 0 or more, got -5"),
    (["data", "prepare", "{root}/corpus.jsonl", "--tokenizer", "{root}/tokenizer.json", "--out", "{root}/x",
      "--workers", "-2"], "--workers: must be at least 1, got -2"),
    (["train", "{root}/config.yaml", "--set", "optim.lr=[1"], "--set: 'optim.lr=[1': the value is not valid YAML"),
    (["train", "{root}/config.yaml", "--dry-run", "--world-size", "0"], "--world-size: must be at least 1, got 0"),
    (["eval", "{root}/tampered", "--tasks", "copa", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["eval", "{root}/tampered", "--tasks", "copa", "--num-fewshot", "-1"], "--num-fewshot: must be 0 or more, got -1"),
    (["viz", "stats", "{root}/tampered", "--data", "{root}/corpus.jsonl", "--out", "{root}/x", "--rows", "0"],
     "--rows: must be at least 1, got 0"),
], ids=["show-negative", "workers-negative", "set-unclosed-bracket", "world-size-zero", "eval-batch-size-zero",
        "eval-fewshot-negative", "viz-rows-zero"])
def test_bad_option_values_are_usage_errors(workspace, capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_:
        main([arg.format(root=workspace) for arg in argv])
    assert exit_.value.code == 2 and expected in capsys.readouterr().err


def test_viz_without_matplotlib_says_how_to_install_it(workspace, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails as when it is not installed
    argv = ["viz", "depth", str(workspace / "tampered"), "--text", "x", "--out", str(workspace / "viz")]
    assert main(argv) == 2
    assert capsys.readouterr().err == ("error: mor viz needs matplotlib: pip install 'mor[viz]' (or pip install "
                                       "matplotlib)\n")
    assert not (workspace / "viz").exists()


def test_sample_passes_overwrite_on(workspace, monkeypatch):
    import mor.cli.data
    import mor.data.sample

    calls = []
    monkeypatch.setattr(mor.data.sample, "prepare_sample", lambda out, **kwargs: calls.append(kwargs) or {})
    monkeypatch.setattr(mor.cli.data, "_summary", lambda index: "")
    assert main(["data", "sample", "--out", str(workspace / "other-data"), "--overwrite"]) == 0
    assert calls == [{"overwrite": True}]


def test_system_errors_name_the_path_and_the_fix(workspace, capsys, monkeypatch):
    prepare_module = importlib.import_module("mor.data.prepare")  # the package exports a function of that name

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(workspace / "out" / "train-00000.bin"))

    monkeypatch.setattr(prepare_module, "prepare", full_disk)
    argv = ["data", "prepare", str(workspace / "corpus.jsonl"), "--tokenizer", str(workspace / "tokenizer.json"),
            "--out", str(workspace / "out")]
    assert main(argv) == 1
    assert capsys.readouterr().err == (f"error: cannot use {workspace}/out/train-00000.bin: no space is left on the "
                                       "device; free some space or write elsewhere\n")


@pytest.mark.parametrize("code, reason, fix", [
    (errno.ENOSPC, "no space is left on the device", "free some space or write elsewhere"),
    (errno.EACCES, "permission denied", "fix its permissions or write elsewhere"),
    (errno.EROFS, "the file system is read-only", "write elsewhere"),
], ids=["full-disk", "permission", "read-only"])
def test_output_checks_and_the_reporter_give_one_fix_per_system_error(tmp_path, monkeypatch, code, reason, fix):
    import tempfile

    from mor.outputs import OutputError, writable_folder

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "probe"))

    monkeypatch.setattr(tempfile, "mkstemp", fail)
    with pytest.raises(OutputError) as error:
        writable_folder(tmp_path, "--out")
    assert str(error.value) == f"--out: cannot write to {tmp_path} ({reason}); {fix}"
    assert describe(OSError(code, os.strerror(code), "/x")) == f"cannot use /x: {reason}; {fix}"


def test_bugs_are_one_line_and_debug_shows_the_traceback(workspace, capsys, monkeypatch):
    import mor.data.shards

    def bug(*args, **kwargs):
        raise KeyError("splits")

    monkeypatch.setattr(mor.data.shards, "read_index", bug)
    argv = ["data", "inspect", str(workspace / "run")]
    assert main(argv) == 1
    assert capsys.readouterr().err == ("error: internal error (KeyError: 'splits'); this is a bug in mor: run again "
                                       "with --debug (or MOR_DEBUG=1) for the traceback and report it\n")
    for debug_argv, env in ((["--debug", *argv], None), ([*argv, "--debug"], None), (argv, "1")):
        if env:
            monkeypatch.setenv("MOR_DEBUG", env)
        assert main(debug_argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback") and "KeyError: 'splits'" in err


def _yaml_error(text: str) -> yaml.YAMLError:
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as error:
        return error
    raise AssertionError(f"{text!r} is valid YAML")


def _diverged() -> Exception:
    from mor.train.trainer import TrainingDiverged

    return TrainingDiverged("step 7: the loss is nan; the last good checkpoint is runs/a/step-5. Lower optim.lr")


# (the error, its one line, the exit status: 2 for bad input, 1 for a run that failed or a bug)
@pytest.mark.parametrize("error, expected, status", [
    (OSError(errno.EACCES, "Permission denied", "/data/x"),
     "cannot use /data/x: permission denied; fix its permissions or write elsewhere", 1),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x"),
     "cannot use /data/x: it does not exist; check the path", 1),
    (FileNotFoundError("no tokenizer at x: give a tokenizer.json"), "no tokenizer at x: give a tokenizer.json", 2),
    (pickle.UnpicklingError("Weights only load failed.\n Re-running with weights_only=False will likely succeed"),
     "a file is not a safe checkpoint: it holds Python objects other than tensors, which could run code when loaded, "
     "so it was refused; use a file from a source you trust", 2),
    (MemoryError(), "out of memory; use a smaller batch (batch.micro_batch_size, --batch-size) or sequence length, or "
                    "a machine with more memory", 1),
    (ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"),
     "No module named 'matplotlib'; install the package that provides it (pip install 'mor[all]' brings every "
     "optional one)", 2),
    (yaml.YAMLError("while parsing\n  a flow sequence"), "while parsing a flow sequence", 2),
    (_yaml_error("a: b: c"), "mapping values are not allowed here at line 1, column 5; correct the YAML there", 2),
    (ValueError("c.yaml: not valid YAML: " + str(_yaml_error("x:\n  - [1, 2\ny: 3"))),
     "c.yaml: not valid YAML: while parsing a flow sequence at line 2, column 5: expected ',' or ']', but got ':' at "
     "line 3, column 2; correct the YAML at line 3, column 2", 2),
    (ValueError("top_p must lie in (0, 1]"), "top_p must lie in (0, 1]", 2),
    (_diverged(), "step 7: the loss is nan; the last good checkpoint is runs/a/step-5. Lower optim.lr", 1),
    (RuntimeError("boom"), "internal error (RuntimeError: boom); this is a bug in mor: run again with --debug (or "
                           "MOR_DEBUG=1) for the traceback and report it", 1),
], ids=["system", "system-not-found", "mor-file-not-found", "unpickling", "memory", "missing-module", "yaml",
        "yaml-marked", "yaml-in-a-config-error", "value", "diverged", "bug"])
def test_each_kind_of_error_is_described_in_one_line(error, expected, status):
    assert describe(error) == expected
    assert exit_status(error) == status


def test_debug_flag_is_left_to_passthrough_commands(monkeypatch):
    monkeypatch.delenv("MOR_DEBUG", raising=False)
    assert split_debug_flag(["train", "c.yaml", "--debug"]) == (["train", "c.yaml"], True)
    assert split_debug_flag(["--debug", "lm-eval", "--debug"]) == (["lm-eval", "--debug"], True)
    assert split_debug_flag(["lm-eval", "--debug"]) == (["lm-eval", "--debug"], False)
    monkeypatch.setenv("MOR_DEBUG", "0")
    assert split_debug_flag(["eval"]) == (["eval"], False)
