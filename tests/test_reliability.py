"""Faults and bad input, as a careful user meets them: concurrent writers, damaged files, poisoned weights, unsafe
pickles, unwritable outputs. docs/reliability.md lists every case with its test."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from helpers import make_dataset, tiny_config

import mor.data.tokenizer as tokenizer_module
from mor import MoRConfig, MoRForCausalLM
from mor.data import DataError, TokenShards, load_tokenizer, prepare, sample_tokenizer_path
from mor.data.prepare import ShardWriter
from mor.integrity import CheckpointError, describe_file
from mor.outputs import LOCK_FILE, FolderLock, OutputError
from mor.train import ConfigError, Trainer, TrainingDiverged, train
from mor.train.checkpoint import last_good_checkpoint, latest_checkpoint, list_checkpoints
from mor.train.run_log import METRICS_FILE, read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("reliability-data"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A run of 2 steps with a checkpoint at each; tests copy it before they damage it."""
    run_dir = tmp_path_factory.mktemp("reliability-run") / "run"
    train(tiny_config(data, run_dir, budget={"steps": 2}, run={"save_every": 1}))
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def rewrite_manifest(checkpoint: Path) -> None:
    """Record the files' current checksums, as a writer of damaged files that also updates the manifest would."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"] = {name: describe_file(checkpoint / name) for name in manifest["files"]}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def overwrite_weights(file: Path, value: bytes, count: int) -> None:
    """Overwrite ``count`` bytes in the middle of the tensor data of a safetensors file (its header stays valid)."""
    raw = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    middle = (start + len(raw)) // 2
    raw[middle:middle + count] = value * count
    file.write_bytes(bytes(raw))


class _Payload:
    """Unpickling this runs a shell command: what a tampered pickle does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------------------------- concurrent writers
def test_a_second_trainer_on_a_run_folder_in_use_is_refused(data, tmp_path):
    config = tiny_config(data, tmp_path / "run")
    first = Trainer(config)
    with pytest.raises(ConfigError, match=re.escape(f"run.out_dir: {tmp_path / 'run'} is in use by mor train "
                                                    f"(process {os.getpid()})")):
        Trainer(tiny_config(data, tmp_path / "run", run={"seed": 2}))
    first.train()
    first.close()
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released with the run
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["run"]["seed"] == 0


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_two_train_commands_on_one_run_folder_never_mix(data, tmp_path):
    config = tiny_config(data, tmp_path / "run", budget={"steps": 10_000}, run={"save_every": 0})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    command = [sys.executable, "-m", "mor.cli", "train", str(config_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / METRICS_FILE).is_file():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        second = subprocess.run(command + ["--set", "run.seed=2"], capture_output=True, text=True, env=env,
                                timeout=120)
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and second.returncode != 0
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: run.out_dir: {tmp_path / 'run'} is in use by mor train (process {first.pid}); wait for it to "
        "finish, stop it, or choose another folder")
    assert "Traceback" not in second.stderr
    steps = [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert steps == list(range(1, len(steps) + 1))  # one loss series
    saved = torch.load(latest_checkpoint(tmp_path / "run") / "trainer.pt", weights_only=True)
    assert saved["config"]["run"]["seed"] == 0


def _hold_and_die(folder: Path) -> None:
    FolderLock(folder, "mor train").acquire()
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_lock_left_by_a_killed_process_is_reported_and_taken_over(tmp_path, capsys):
    process = multiprocessing.get_context("fork").Process(target=_hold_and_die, args=(tmp_path,))
    process.start()
    process.join(60)
    assert process.exitcode == -signal.SIGKILL and (tmp_path / LOCK_FILE).is_file()  # the file stays behind
    with FolderLock(tmp_path, "mor train"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (f"{tmp_path} was locked by mor train (process {process.pid}), which is no longer running"
            in capsys.readouterr().err)


def test_prepare_refuses_a_folder_another_process_is_preparing(tmp_path):
    (tmp_path / "a.txt").write_text("the first corpus " * 50)
    (tmp_path / "b.txt").write_text("another corpus " * 50)
    first = prepare([tmp_path / "a.txt"], sample_tokenizer_path(), tmp_path / "out", val_fraction=0, progress=False)
    with FolderLock(tmp_path / "out", "mor data prepare"):
        with pytest.raises(OutputError, match="is in use by mor data prepare"):
            prepare([tmp_path / "b.txt"], sample_tokenizer_path(), tmp_path / "out", val_fraction=0, overwrite=True,
                    progress=False)
    assert TokenShards(tmp_path / "out").index == first  # the finished dataset is untouched


def test_a_failed_writer_removes_only_its_own_files(tmp_path):
    finished = tmp_path / "train-00000.bin"
    finished.write_bytes(b"\x01\x00" * 8)  # a shard another run finished
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=4)
    writer.write(np.arange(10), documents=1)
    writer.discard()
    assert [p.name for p in tmp_path.iterdir()] == ["train-00000.bin"] and finished.read_bytes() == b"\x01\x00" * 8


# ------------------------------------------------------------------------------------------------- verified loads
def test_loading_checks_the_manifest_unless_told_not_to(run_copy):
    checkpoint = latest_checkpoint(run_copy)
    expected = {name: t.clone() for name, t in load_file(checkpoint / "model.safetensors").items()}  # not the mmap
    overwrite_weights(checkpoint / "model.safetensors", b"\x07", 64)  # plausible values, wrong ones
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum in manifest.json"):
        MoRForCausalLM.from_pretrained(checkpoint)
    model = MoRForCausalLM.from_pretrained(checkpoint, verify=False)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_non_finite_weights_are_refused(run_copy, tmp_path):
    checkpoint = latest_checkpoint(run_copy)
    overwrite_weights(checkpoint / "model.safetensors", b"\xff", 64)  # 0xFF bytes are NaN
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        MoRForCausalLM.from_pretrained(checkpoint, verify=False)
    model = MoRForCausalLM(MoRConfig.from_preset("tiny"))  # a save_pretrained folder: no manifest
    with torch.no_grad():
        model.model.norm.weight[0] = float("inf")
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="model.norm.weight holds NaN or infinite values"):
        MoRForCausalLM.from_pretrained(tmp_path / "plain")


def test_a_tampered_trainer_state_is_refused_as_unsafe(data, run_copy, tmp_path):
    checkpoint = latest_checkpoint(run_copy)
    torch.save({"step": _Payload(tmp_path / "pwned")}, checkpoint / "trainer.pt")
    rewrite_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="trainer.pt is not a safe checkpoint") as error:
        Trainer(tiny_config(data, run_copy, budget={"steps": 3}), resume="latest")
    assert "weights_only" not in str(error.value) and not (tmp_path / "pwned").exists()


def test_checkpoint_files_share_one_mode(finished, tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    MoRForCausalLM(MoRConfig.from_preset("tiny")).save_pretrained(tmp_path)
    for folder in (latest_checkpoint(finished), tmp_path):
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert modes == dict.fromkeys(modes, expected), modes


# ------------------------------------------------------------------------------------------------- poisoned checkpoints
def test_exploded_weights_are_never_saved(data, tmp_path):
    config = tiny_config(data, tmp_path / "run", optim={"lr": 1e30}, schedule={"warmup": 0},
                         run={"save_every": 1})
    with pytest.raises(TrainingDiverged, match=r"the weights exploded; the weights of step 1 were not saved\) at "
                                               r"step 1 .*the last good checkpoint is none"):
        train(config)
    assert list_checkpoints(tmp_path / "run") == []
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_only_checked_checkpoints_are_named_last_good(run_copy):
    first, second = list_checkpoints(run_copy)
    assert last_good_checkpoint(run_copy) == second
    manifest = json.loads((second / "manifest.json").read_text())
    del manifest["weights_checked"]  # as written by a version of mor that did not check
    (second / "manifest.json").write_text(json.dumps(manifest))
    assert last_good_checkpoint(run_copy) == first


def test_resuming_from_exploded_weights_is_refused(data, run_copy):
    checkpoint = latest_checkpoint(run_copy)
    weights = load_file(checkpoint / "model.safetensors")
    weights["model.norm.weight"] *= 1e30
    with safe_open(checkpoint / "model.safetensors", "pt") as handle:  # keep the tied-weight aliases
        metadata = handle.metadata()
    save_file(weights, checkpoint / "model.safetensors", metadata=metadata)
    rewrite_manifest(checkpoint)
    with pytest.raises(CheckpointError, match="model.norm.weight holds a value of magnitude 1e.30.*exploded"):
        Trainer(tiny_config(data, run_copy, budget={"steps": 3}), resume="latest")


def test_resuming_with_the_same_data_at_another_path_is_accepted(data, run_copy, tmp_path):
    shutil.copytree(data, tmp_path / "moved")
    trainer = Trainer(tiny_config(tmp_path / "moved", run_copy, budget={"steps": 3}), resume="latest")
    assert trainer.step == 2
    trainer.close()


def test_temporary_folders_of_killed_writers_are_removed(data, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "checkpoints" / f".tmp-step_00000001-{dead.pid}"
    live = tmp_path / "checkpoints" / f".tmp-step_00000001-{os.getppid()}"
    for folder in (stale, live):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"partial")
    train(tiny_config(data, tmp_path, budget={"steps": 1}, schedule={"warmup": 0}))
    assert not stale.exists() and live.is_dir()


# ------------------------------------------------------------------------------------------------- data shards
def test_flipped_shard_bytes_are_found_and_prepared_again(data, tmp_path, capsys):
    shutil.copytree(data, tmp_path / "data")
    shard = tmp_path / "data" / "train-00000.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:100] + bytes(b ^ 0xFF for b in good[100:110]) + good[110:])  # same size
    corpus = data.parent / "corpus.jsonl"
    prepare([corpus], data.parent / "tokenizer.json", tmp_path / "data", val_fraction=0.1)
    assert "train-00000.bin (checksum differs); preparing it again" in capsys.readouterr().out
    assert shard.read_bytes() == good


def test_token_ids_outside_the_vocabulary_stop_with_the_shard_named(data, tmp_path):
    shutil.copytree(data, tmp_path / "data")
    shard = tmp_path / "data" / "train-00000.bin"
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    with pytest.raises(DataError, match=r"train-00000.bin holds token id 65535 at position 5, outside the 300 "
                                        r"tokens .* the shard is corrupt"):
        TokenShards(tmp_path / "data").read(5, 10)
    trainer = Trainer(tiny_config(tmp_path / "data", tmp_path / "run"))
    with pytest.raises(DataError, match="the shard is corrupt"):  # not an IndexError from the embedding
        trainer.train()
    trainer.close()


def test_long_documents_are_tokenized_in_pieces_with_the_same_ids(monkeypatch):
    tok = load_tokenizer(sample_tokenizer_path())
    text = ("KING. Now, lords,  the 3 crowns of 1606; and\tthe  sea!\n " * 400).strip()
    whole = tok.encode(text)

    class Recorder:
        def __init__(self, backend):
            self.backend, self.lengths = backend, []

        def encode_batch(self, texts, add_special_tokens):
            self.lengths += [len(t) for t in texts]
            return self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)

    recorder = Recorder(tok._text_backend)
    monkeypatch.setattr(tok, "_text_backend", recorder)
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 1000)
    assert tok.encode_batch(["short", text]) == [tok.encode("short"), whole]
    assert max(recorder.lengths) <= 1000 and len(recorder.lengths) > len(text) // 1000


def test_tokenizers_that_cannot_be_cut_get_long_documents_whole(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, normalizers

    vocab = {"<|endoftext|>": 0, "▁": 1, "a": 2, "▁a": 3, "b": 4}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], unk_token="<|endoftext|>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert not tok.splits_long_texts  # every piece would get its own leading "▁"
    monkeypatch.setattr(tokenizer_module, "PIECE_CHARS", 8)
    text = "a b a ab ba a b"
    assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------------- generation input
@pytest.mark.parametrize("input_ids, message", [
    (torch.zeros(0, 5, dtype=torch.long), r"holds no prompts \(shape \(0, 5\)\)"),
    (torch.full((1, 3), 400), r"token id 400, outside the model's vocabulary \(0 to 299\)"),
    (torch.full((1, 3), -1), r"token id -1, outside"),
    (torch.zeros(1, 3), "must hold integer token ids, got torch.float32"),
], ids=["empty-batch", "above-vocab", "negative", "float"])
def test_generate_explains_bad_token_ids(input_ids, message):
    model = MoRForCausalLM(MoRConfig.from_preset("tiny", vocab_size=300))
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids, max_new_tokens=2)


# ------------------------------------------------------------------------------------------------- outputs
def test_outputs_under_a_file_fail_before_any_work(data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"run.out_dir: cannot write to .*file/run \(a part of the path is a file"):
        Trainer(tiny_config(data, blocker / "run"))
    with pytest.raises(OutputError, match="output folder: .*file is a file, not a folder"):
        prepare([data.parent / "corpus.jsonl"], data.parent / "tokenizer.json", blocker, progress=False)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write in: read-only for a user, immutable (chattr +i) for root, who ignores modes."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("root needs chattr +i (CAP_LINUX_IMMUTABLE) for a folder it cannot write")
    yield folder
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_an_unwritable_folder_fails_before_any_work(data, read_only_folder, capsys):
    from mor.cli import main

    with pytest.raises(ConfigError, match=r"run.out_dir: cannot write to .*read-only \((permission denied|the "
                                          r"operation is not permitted)"):
        Trainer(tiny_config(data, read_only_folder))
    with pytest.raises(OutputError, match=r"output folder: cannot write to .*read-only"):
        prepare([data.parent / "corpus.jsonl"], data.parent / "tokenizer.json", read_only_folder, progress=False)
    assert main(["eval", "nowhere", "--tasks", "copa", "--out", str(read_only_folder / "x.json")]) == 2
    assert "--out: cannot write to" in capsys.readouterr().err  # before the checkpoint is even looked at
    assert list(read_only_folder.iterdir()) == []
