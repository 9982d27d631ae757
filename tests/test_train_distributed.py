"""Two gloo processes (DDP and FSDP2) train exactly like one process on the same global batch."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import make_dataset, tiny_config

from mor import MoRForCausalLM
from mor.train import Trainer, train
from mor.train.checkpoint import latest_checkpoint
from mor.train.run_log import read_metrics

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform != "linux",
                                reason="needs torch.distributed with gloo and fork")

SECTIONS = dict(batch={"micro_batch_size": 2, "global_batch_size": 8}, budget={"steps": 4},
                run={"eval_every": 2, "eval_batches": 2})


def _run_two(worker, *args, timeout: float = 90.0) -> bool:
    """Run ``worker(rank, 2, port, *args)`` in two spawned processes; False if they did not finish in time.

    A worker's exception propagates (``mp.ProcessRaisedException``)."""
    context = mp.start_processes(worker, args=(2, _free_port(), *args), nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            return False
    return True


def _with_one_retry(scenario, root) -> Path:
    """Run ``scenario(directory) -> bool`` in a fresh directory, once more if it hung.

    Two-process gloo runs used to hang now and then at exit, when the DDP/FSDP objects were freed after the
    process group was destroyed (``Trainer.close`` now frees them first). The deadline keeps any such hang
    from blocking the suite, and the retry covers a rare one, while a real failure fails both attempts."""
    for attempt in range(2):
        directory = root / f"attempt{attempt}"
        if scenario(directory):
            return directory
    pytest.fail("the two training processes hung twice")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, data, out_dir, strategy: str, model: dict | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)  # a fresh process: tiny models run faster on one thread
    run = {**SECTIONS["run"], "strategy": strategy}
    train(tiny_config(data, out_dir, **{**SECTIONS, "run": run, "model": model or {}}))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    data = make_dataset(root)
    train(tiny_config(data, root / "run", **SECTIONS))
    return data, read_metrics(root / "run")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, strategy):
    data, expected = single
    run = _with_one_retry(lambda directory: _run_two(_worker, data, directory, strategy), tmp_path)
    got = read_metrics(run)
    assert_same_curve(got, expected)
    assert sum("loss" in m for m in got) == 4 and sum("val/nll_topk" in m for m in got) == 2
    model = MoRForCausalLM.from_pretrained(latest_checkpoint(run))  # the tied head stored once, whatever the wrapper
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.slow
def test_two_processes_balance_token_choice_loads_as_one(single, tmp_path):
    # Loss-free balancing: the trainer sums the loads of both ranks, so each moves its bias as one process does.
    data, _ = single
    model = {"router": "token", "balancing": "loss_free", "balancing_bias_rate": 0.05, "num_recursions": 3}
    one = train(tiny_config(data, tmp_path / "one", **SECTIONS, model=model))
    run = _with_one_retry(lambda directory: _run_two(_worker, data, directory, "ddp", model), tmp_path)
    assert_same_curve(read_metrics(run), read_metrics(tmp_path / "one"))
    biases = [MoRForCausalLM.from_pretrained(c).model.token.balancing_bias for c in (one.checkpoint,
                                                                                     latest_checkpoint(run))]
    assert torch.equal(biases[1], biases[0])


def assert_same_curve(got: list[dict], expected: list[dict]) -> None:
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for mine, theirs in zip(got, expected):
        for key in ("loss", "lm_loss", "grad_norm", "val/nll", "val/nll_topk", "val/nll_causal"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (mine["step"], key)
        assert mine["tokens"] == theirs["tokens"]  # tokens count every rank


def _worker_crashing(rank: int, world_size: int, port: int, data, out_dir, strategy: str, crash_at: int | None,
                     resume: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    if crash_at is not None:  # in this child process only
        step = Trainer._train_step

        def crash(self, batch):
            if self.step == crash_at:
                raise RuntimeError("simulated crash")
            return step(self, batch)

        Trainer._train_step = crash
    run = {**SECTIONS["run"], "strategy": strategy, "save_every": 2}
    train(tiny_config(data, out_dir, **{**SECTIONS, "run": run}), resume=resume)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_resume_exactly(single, tmp_path, strategy):
    data, expected = single

    def crash_then_resume(directory: Path) -> bool:
        try:
            finished = _run_two(_worker_crashing, data, directory, strategy, 3, None)
        except mp.ProcessRaisedException as error:
            assert "simulated crash" in str(error)
        else:
            if not finished:
                return False
            pytest.fail("the first run was meant to crash at step 4")
        return _run_two(_worker_crashing, data, directory, strategy, None, "latest")

    got = read_metrics(_with_one_retry(crash_then_resume, tmp_path))
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for mine, theirs in zip(got, expected):
        for key in ("loss", "grad_norm", "val/nll_topk"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (mine["step"], key)


def test_fsdp_sees_the_output_tensors():
    # FSDP2 hooks its backward on the output tensors found by tree_flatten in some torch versions (2.11); an
    # opaque output dataclass left every sharded gradient empty on GPUs.
    from torch.utils._pytree import tree_flatten

    from mor import MoRConfig, MoRForCausalLM
    from mor.train.distributed import _expose_output_tensors

    _expose_output_tensors()
    model = MoRForCausalLM(MoRConfig.from_preset("tiny", sharing="middle_cycle", num_recursions=2, router="expert"))
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, labels=ids)
    leaves = tree_flatten(out)[0]
    assert any(t is out.loss for t in leaves) and any(t is out.logits for t in leaves)


def test_more_processes_than_gpus_is_a_config_error(monkeypatch):
    """torchrun with more processes per node than GPUs: a message that says so, not a CUDA 'invalid device ordinal'."""
    from mor.train import distributed
    from mor.train.config import ConfigError, RunConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"wants cuda:1 but the machine has 1 GPU\(s\)"):
        distributed.setup(RunConfig())


def test_fsdp_shards_over_a_mesh_of_the_training_device(monkeypatch):
    """FSDP2's default mesh is CUDA whenever a GPU exists: a CPU (gloo) run on a GPU machine must name its own."""
    import torch.distributed.fsdp as fsdp

    from mor import MoRConfig, MoRForCausalLM
    from mor.train import distributed

    meshes = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, mesh=None: meshes.append(mesh))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = MoRForCausalLM(MoRConfig.from_preset("tiny"))
        distributed.wrap(model, "fsdp", distributed.DistEnv(0, 0, 1, torch.device("cpu")))
    finally:
        dist.destroy_process_group()
    [mesh] = meshes
    assert mesh is not None and mesh.device_type == "cpu" and mesh.size() == 1
