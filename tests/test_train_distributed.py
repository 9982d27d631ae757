"""Two gloo processes (DDP and FSDP2) train exactly like one process on the same global batch."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_train_support import make_dataset, tiny_config

from mor.train import Trainer, train
from mor.train.run_log import read_metrics

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform != "linux",
                                reason="needs torch.distributed with gloo and fork")

SECTIONS = dict(batch={"micro_batch_size": 2, "global_batch_size": 8}, budget={"steps": 4},
                run={"eval_every": 2, "eval_batches": 2})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, data, out_dir, strategy: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    train(tiny_config(data, out_dir, **{**SECTIONS, "run": {**SECTIONS["run"], "strategy": strategy}}))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    data = make_dataset(root)
    train(tiny_config(data, root / "run", **SECTIONS))
    return data, read_metrics(root / "run")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(single, tmp_path, strategy):
    data, expected = single
    # fork: the children reuse this process's imports (spawn would re-import torch in each, ~10 s)
    mp.start_processes(_worker, args=(2, _free_port(), data, tmp_path / "run", strategy), nprocs=2,
                       start_method="fork")
    got = read_metrics(tmp_path / "run")
    assert [m["step"] for m in got] == [m["step"] for m in expected]
    for mine, theirs in zip(got, expected):
        for key in ("loss", "lm_loss", "grad_norm", "val/nll_topk", "val/nll_causal"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (mine["step"], key)
        assert mine["tokens"] == theirs["tokens"]  # tokens count every rank
    assert sum("loss" in m for m in got) == 4 and sum("val/nll_topk" in m for m in got) == 2


def _worker_crashing(rank: int, world_size: int, port: int, data, out_dir, strategy: str, crash_at: int | None,
                     resume: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    if crash_at is not None:  # this forked child only
        step = Trainer._train_step

        def crash(self, batch):
            if self.step == crash_at:
                raise RuntimeError("simulated crash")
            return step(self, batch)

        Trainer._train_step = crash
    run = {**SECTIONS["run"], "strategy": strategy, "save_every": 2}
    train(tiny_config(data, out_dir, **{**SECTIONS, "run": run}), resume=resume)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_resume_exactly(single, tmp_path, strategy):
    data, expected = single
    with pytest.raises(mp.ProcessRaisedException, match="simulated crash"):
        mp.start_processes(_worker_crashing, args=(2, _free_port(), data, tmp_path / "run", strategy, 3, None),
                           nprocs=2, start_method="fork")
    mp.start_processes(_worker_crashing, args=(2, _free_port(), data, tmp_path / "run", strategy, None, "latest"),
                       nprocs=2, start_method="fork")
    got = read_metrics(tmp_path / "run")
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
