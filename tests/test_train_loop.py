"""The training loop on CPU: accumulation invariance, exact resume, NaN stop, checkpoint safety, run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from helpers import make_dataset, tiny_config

from mor import MoRForCausalLM
from mor.train import ConfigError, Trainer, TrainingDiverged, train
from mor.train.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from mor.train.run_log import read_metrics

CURVE_KEYS = ("step", "tokens", "loss", "lm_loss", "grad_norm", "lr")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train-data"))


def curve(run_dir) -> list[dict]:
    """Every logged value except wall-clock ones (speed, memory)."""
    return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "peak_memory_gib", "mfu")}
            for m in read_metrics(run_dir)]


def weights(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def test_accumulation_split_does_not_change_training(data, tmp_path):
    # Validation reads eval_batches x micro_batch_size rows: 8 in both runs.
    one = tiny_config(data, tmp_path / "one", batch={"micro_batch_size": 8, "grad_accum": 1}, budget={"steps": 4},
                      run={"eval_batches": 1})
    four = tiny_config(data, tmp_path / "four", batch={"micro_batch_size": 2, "grad_accum": 4}, budget={"steps": 4},
                       run={"eval_batches": 4})
    a, b = train(one), train(four)
    curve_a, curve_b = curve(tmp_path / "one"), curve(tmp_path / "four")
    assert len(curve_a) == len(curve_b) == 5  # 4 steps and the final validation
    for x, y in zip(curve_a, curve_b):
        assert x.keys() == y.keys()
        for key in x.keys() - {"router/dead_token_ratio"}:  # positions never selected *within a batch*
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), key
    assert curve_a[0]["loss"] != curve_a[3]["loss"]  # it did train
    wa, wb = weights(a.checkpoint), weights(b.checkpoint)
    for name in wa:
        if wa[name].is_floating_point():  # not the model's count of forward calls (capacity warm-up)
            torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)  # Adam amplifies float noise


def test_the_chunked_loss_and_regional_compilation_train_like_the_plain_run(data, tmp_path):
    runs = {}
    for chunked, compile in ((False, False), (True, "regional")):
        out = tmp_path / str(chunked)
        train(tiny_config(data, out, budget={"steps": 3},
                          run={"chunked_loss": chunked, "compile": compile, "eval_batches": 1}))
        runs[chunked] = curve(out)
    assert len(runs[True]) == len(runs[False]) == 4
    for x, y in zip(runs[False], runs[True]):
        assert x.keys() == y.keys()
        for key in x.keys() & {"loss", "lm_loss", "grad_norm", "val/nll_topk", "val/nll_causal"}:
            assert y[key] == pytest.approx(x[key], rel=1e-4), key
    assert "val/nll_causal" in runs[True][-1] and runs[True][0]["loss"] != runs[True][2]["loss"]


@pytest.mark.parametrize("model", [
    # expert-choice with the auxiliary router's own param group, resumed in the middle of the capacity warm-up
    {"expert_sampling": "aux_router", "capacity_warmup_steps": 16},
    {"router": "token", "balancing": "loss_free"},  # the balancing bias buffer must be restored
    {"router": "token", "random_router": True},  # random depths: the RNG state must be restored
], ids=["expert-aux-router", "token-loss-free", "random-router"])
def test_resume_after_crash_reproduces_the_run_exactly(data, tmp_path, monkeypatch, model):
    sections = dict(model=model, budget={"steps": 6}, batch={"micro_batch_size": 2, "grad_accum": 2},
                    run={"save_every": 2, "eval_every": 3})
    reference = train(tiny_config(data, tmp_path / "reference", **sections))

    config = tiny_config(data, tmp_path / "crashed", **sections)
    step = Trainer._train_step

    def crash_in_step_4(self, batch):
        if self.step == 3:
            raise RuntimeError("simulated crash")
        return step(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", crash_in_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "crashed").name == "step_00000002"
    assert [m["step"] for m in read_metrics(tmp_path / "crashed")][-1] == 3  # logged past the checkpoint

    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(config)  # never overwrite a run by accident
    resumed = train(config, resume="latest")
    assert curve(tmp_path / "crashed") == curve(tmp_path / "reference")  # exact equality, validation included
    assert resumed.validation == reference.validation
    final, expected = weights(resumed.checkpoint), weights(reference.checkpoint)
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def _crash_at(monkeypatch, step_number: int) -> None:
    step = Trainer._train_step

    def crash(self, batch):
        if self.step == step_number:
            raise RuntimeError("simulated crash")
        return step(self, batch)

    monkeypatch.setattr(Trainer, "_train_step", crash)


def test_resume_takes_hyper_parameters_from_the_config(data, tmp_path, monkeypatch):
    # The divergence hint says: lower optim.lr, then resume. The new lr must be the one used.
    sections = dict(budget={"steps": 6}, run={"save_every": 2}, schedule={"kind": "cosine", "warmup": 1})
    _crash_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_config(data, tmp_path, optim={"lr": 3e-3}, **sections))
    monkeypatch.undo()
    lower = tiny_config(data, tmp_path, optim={"lr": 1e-3, "weight_decay": 0.02}, **sections)
    trainer = Trainer(lower, resume="latest")
    multiplier = trainer.scheduler.lr_lambdas[0]
    assert trainer.scheduler.base_lrs[0] == pytest.approx(1e-3)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * multiplier(2))
    assert max(g["weight_decay"] for g in trainer.optimizer.param_groups) == pytest.approx(0.02)
    trainer.train()
    trainer.close()
    logged = {m["step"]: m["lr"] for m in read_metrics(tmp_path) if "lr" in m}
    assert logged[6] == pytest.approx(1e-3 * multiplier(5))


def test_resuming_an_earlier_checkpoint_sets_the_abandoned_branch_aside(data, tmp_path, monkeypatch):
    config = tiny_config(data, tmp_path, budget={"steps": 6}, run={"save_every": 2, "keep_last": 2})
    train(config)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000006"]
    _crash_at(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, resume=tmp_path / "checkpoints" / "step_00000004")
    assert latest_checkpoint(tmp_path).name == "step_00000004"  # not the abandoned step 6
    assert (tmp_path / "checkpoints" / "abandoned" / "step_00000006").is_dir()


def test_nan_loss_stops_the_run_with_step_checkpoint_and_hint(data, tmp_path):
    trainer = Trainer(tiny_config(data, tmp_path, run={"save_every": 2}))
    forward = trainer.model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step == 3:
            out.loss = out.loss * float("nan")
        return out

    trainer.model.forward = poisoned
    with pytest.raises(TrainingDiverged) as error:
        trainer.train()
    message = str(error.value)
    assert "nan at step 4" in message and "step_00000002" in message and "optim.lr" in message
    assert trainer.step == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the bad update was not applied
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]


def test_non_finite_gradients_stop_the_run_before_the_update(data, tmp_path):
    trainer = Trainer(tiny_config(data, tmp_path, run={"save_every": 2}))
    embedding = trainer.module.model.embed_tokens.weight
    hook = embedding.register_hook(lambda grad: grad * float("inf") if trainer.step == 3 else grad)
    with pytest.raises(TrainingDiverged, match="gradient norm is (inf|nan) at step 4"):
        trainer.train()
    hook.remove()
    assert trainer.step == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.fixture
def finished(data, tmp_path):
    config = tiny_config(data, tmp_path / "run", budget={"steps": 2}, run={"save_every": 1})
    result = train(config)
    return config, result.checkpoint


def test_run_directory_records_everything(finished):
    config, checkpoint = finished
    run_dir = checkpoint.parent.parent
    info = json.loads((run_dir / "run.json").read_text())
    assert info["steps"] == 2 and info["world_size"] == 1 and info["environment"]["torch"] == torch.__version__
    assert (run_dir / "config.yaml").is_file() and (run_dir / "model_config.json").is_file()
    record = read_metrics(run_dir)[0]
    assert {"loss", "lm_loss", "aux/router_bce", "lr", "grad_norm", "tokens_per_s", "peak_memory_gib",
            "router/sampling_accuracy/step2", "router/dead_token_ratio"} <= record.keys()
    assert "mfu" not in record  # unknown peak FLOP/s on CPU
    assert {"val/nll_topk", "val/nll_causal"} <= read_metrics(run_dir)[-1].keys()
    # keep_last (3) and the step-1 checkpoint is a loadable model directory that carries its tokenizer
    model = MoRForCausalLM.from_pretrained(list_checkpoints(run_dir)[0])
    assert model.config.to_dict() == config.model_config().to_dict()
    tokenizer = checkpoint / "tokenizer.json"
    assert tokenizer.read_bytes() == (Path(config.data.path) / "tokenizer.json").read_bytes()


def test_training_checkpoints_and_save_pretrained_write_the_same_files(finished, tmp_path):
    # One writer of the format (mor.model.io): re-saving a checkpoint's model gives the same files.
    _, checkpoint = finished
    saved = tmp_path / "saved"
    MoRForCausalLM.from_pretrained(checkpoint).save_pretrained(saved)
    assert (saved / "config.json").read_bytes() == (checkpoint / "config.json").read_bytes()
    with safe_open(saved / "model.safetensors", "pt") as ours, \
            safe_open(checkpoint / "model.safetensors", "pt") as theirs:
        assert ours.metadata() == theirs.metadata() and list(ours.keys()) == list(theirs.keys())
        assert all(torch.equal(ours.get_tensor(name), theirs.get_tensor(name)) for name in theirs.keys())


def test_init_from_starts_from_a_saved_model(data, tmp_path):
    source = MoRForCausalLM(tiny_config(data, tmp_path / "unused").model_config())
    source.save_pretrained(tmp_path / "start")

    def config_from(out: str, **model):
        config = tiny_config(data, tmp_path / out, budget={"steps": 4})
        config.model = model
        config.validate()
        return config

    config = config_from("run", init_from=str(tmp_path / "start"), aux_loss_coeff=0.01)
    assert config.model_config() == source.config.replace(aux_loss_coeff=0.01)
    trainer = Trainer(config)
    for name, value in source.state_dict().items():
        torch.testing.assert_close(trainer.module.state_dict()[name], value, rtol=0, atol=0)
    trainer.close()
    with pytest.raises(ConfigError, match="init_from"):
        config_from("run2", init_from=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="preset or init_from"):
        config_from("run3", init_from=str(tmp_path / "start"), preset="tiny")
    with pytest.raises(ConfigError, match="init_from"):  # an override that changes weight shapes
        Trainer(config_from("run4", init_from=str(tmp_path / "start"), intermediate_size=64))


def test_tied_weights_are_stored_once_when_the_gathered_state_holds_copies(data, tmp_path, monkeypatch):
    """Gathering the state onto the CPU (from a GPU, or from FSDP shards) copies every tensor, so the tied head
    and embedding arrive as two tensors; the checkpoint must still load as a model and resume."""
    from mor.train import checkpoint as checkpoints

    gather = checkpoints.get_model_state_dict
    monkeypatch.setattr(checkpoints, "get_model_state_dict",
                        lambda model, options: {k: v.clone() for k, v in gather(model, options=options).items()})
    config = tiny_config(data, tmp_path / "run", budget={"steps": 2}, run={"save_every": 1})
    assert config.model_config().tie_word_embeddings
    first = train(config)
    assert "lm_head.weight" not in weights(first.checkpoint)
    model = MoRForCausalLM.from_pretrained(first.checkpoint)
    assert model.lm_head.weight is model.model.embed_tokens.weight

    config.budget.steps = 3
    resumed = train(config, resume="latest")
    assert torch.equal(weights(resumed.checkpoint)["model.embed_tokens.weight"],
                       MoRForCausalLM.from_pretrained(resumed.checkpoint).lm_head.weight)


def test_truncated_checkpoint_is_refused(finished):
    config, checkpoint = finished
    weights_file = checkpoint / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        Trainer(config, resume=checkpoint)


def test_corrupt_checkpoint_is_refused(finished):
    config, checkpoint = finished
    state = bytearray((checkpoint / "trainer.pt").read_bytes())
    state[len(state) // 2] ^= 0xFF
    (checkpoint / "trainer.pt").write_bytes(bytes(state))
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(config, resume="latest")


def test_checkpoint_of_another_model_is_refused(finished, data):
    config, checkpoint = finished
    other = tiny_config(data, checkpoint.parent.parent, model={"num_recursions": 3}, budget={"steps": 2})
    with pytest.raises(CheckpointError, match="different model config.*num_recursions: checkpoint 2 vs config 3"):
        Trainer(other, resume="latest")


def test_incomplete_checkpoint_is_refused_and_ignored(finished, tmp_path):
    config, checkpoint = finished
    (checkpoint / "manifest.json").unlink()  # as if the process died before the rename
    assert latest_checkpoint(checkpoint.parent.parent) != checkpoint
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        Trainer(config, resume=checkpoint)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Trainer(config, resume=tmp_path / "nowhere")


def test_data_problems_are_config_errors(data, tmp_path):
    with pytest.raises(ConfigError, match="data.path: .* not a prepared token folder"):
        Trainer(tiny_config(tmp_path / "nothing", tmp_path / "a"))
    with pytest.raises(ConfigError, match="model.vocab_size: 256 is smaller than the 300 tokens"):
        Trainer(tiny_config(data, tmp_path / "b", model={"vocab_size": 256}))
    with pytest.raises(ConfigError, match="data.seq_len: 512 exceeds model.max_position_embeddings 256"):
        Trainer(tiny_config(data, tmp_path / "c", data={"seq_len": 512}))
