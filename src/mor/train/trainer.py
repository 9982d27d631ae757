"""The training loop: gradient accumulation, router upkeep, validation, logging, checkpoints and stop signals.

Each optimizer step takes one batch of ``micro_batch_size x grad_accum`` sequences per rank from the loader and
splits it into micro-batches, so the data of a step does not depend on the accumulation split. Every loss of a
micro-batch is weighted by its share of the step's label tokens (over all ranks), which makes the update equal
to one forward pass over the whole global batch whatever the split and the number of processes.
"""

from __future__ import annotations

import contextlib
import gc
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from mor import MoRForCausalLM
from mor.config import MoRConfig
from mor.data import PackedBatches, TokenShards, sequential_batches
from mor.data.tokenizer import TOKENIZER_FILE
from mor.model.flops import training_flops_per_token
from mor.outputs import FolderLock, OutputError
from mor.train import distributed
from mor.train.budget import Budget, resolve_budget
from mor.train.checkpoint import (BadWeightsError, CheckpointError, last_good_checkpoint, latest_checkpoint,
                                  list_checkpoints, restore_checkpoint, rng_state, save_checkpoint,
                                  set_aside_later_checkpoints, set_rng_state)
from mor.train.config import ConfigError, TrainConfig
from mor.train.optim import build_optimizer, clip_gradients
from mor.train.run_log import METRICS_FILE, RunLog, peak_flops, peak_memory_gib
from mor.train.schedule import build_scheduler


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    step: int
    tokens: int
    loss: float | None
    validation: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped_by: str | None = None  # name of the signal that interrupted the run


class Trainer:
    def __init__(self, config: TrainConfig, resume: str | Path | None = None) -> None:
        self.config = config
        self.env = distributed.setup(config.run)
        self.run_dir = Path(config.run.out_dir)
        self.model_config = config.model_config()
        self.budget: Budget = resolve_budget(config, self.model_config, self.env.world_size)
        self.loader, self.val_shards = open_data(config, self.model_config, self.budget, self.env.rank,
                                                 self.env.world_size)
        self.train_shards = self.loader.shards
        self._lock = self._lock_run_dir()
        try:
            self._build(resume)
        except BaseException:
            self._unlock()
            raise

    def _build(self, resume: str | Path | None) -> None:
        config = self.config
        resume_from = resume_checkpoint(self.run_dir, resume)
        _seed_everything(config.run.seed)  # identical initial weights on every rank (FSDP does not broadcast)
        model = MoRForCausalLM(self.model_config)
        init_from = config.model.get("init_from")
        if init_from is not None and resume_from is None:
            _load_initial_weights(model, init_from)
        model.to(self.env.device)
        compile_mode = config.run.compile_mode(self.env.device.type)
        if compile_mode == "regional":
            model.compile_regions()
        elif compile_mode == "whole":
            model.compile()  # also turns on Dynamo's capture_scalar_outputs for this process (token-choice)
        self.model = distributed.wrap(model, config.run.strategy, self.env)
        self.module: MoRForCausalLM = distributed.unwrap(self.model)
        aux_params = list(self.module.aux_router_parameters())
        self.optimizer = build_optimizer(self.module, aux_params, config.optim, self.env.device)
        self.scheduler = build_scheduler(self.optimizer, config.schedule, self.budget.steps)
        self.autocast = _autocast(config.run.dtype, self.env.device)
        self.step = 0
        self.tokens = 0

        self.log = RunLog(self.run_dir, enabled=self.env.is_main, tensorboard=config.run.tensorboard)
        if resume_from is not None:
            self._restore(resume_from)
        self.log.write_run_info(config.to_dict(), self.model_config, self._run_info(resume_from))
        self.log.truncate_after(self.step)
        self._stop_signal: int | None = None

    # ---------------------------------------------------------------------------------------------- setup
    def _lock_run_dir(self) -> FolderLock | None:
        """Rank 0 holds the run directory for the run's life: a second run started on it stops here, before it
        could mix its metrics and checkpoints into this one's."""
        lock, error = None, None
        if self.env.is_main:
            try:
                lock = FolderLock(self.run_dir, "mor train").acquire()
            except OutputError as failure:
                error = failure
        if distributed.any_rank(error is not None, self.env.device):
            raise ConfigError(f"run.out_dir: {error}" if error else "run.out_dir: rank 0 could not lock the run "
                              "directory (see its message)")
        return lock

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _restore(self, path: Path) -> None:
        # The config's hyper-parameters win over the checkpoint's (e.g. a lower optim.lr after a divergence):
        # the checkpoint supplies the optimizer moments and the position in the schedule, nothing else.
        configured = [{k: g[k] for k in ("initial_lr", "weight_decay", "betas", "eps")}
                      for g in self.optimizer.param_groups]
        state, rank_state = restore_checkpoint(path, self.model, self.optimizer, self.model_config)
        if state["tokens_per_step"] != self.budget.tokens_per_step:
            raise CheckpointError(f"{path} was trained with {state['tokens_per_step']} tokens per step, this config "
                                  f"has {self.budget.tokens_per_step}; keep batch and data.seq_len of the run")
        saved_data = state.get("data_shards")  # absent in checkpoints of older versions
        if saved_data is not None and saved_data != self._data_shards():
            raise CheckpointError(f"{path} was trained on other data than data.path {self.config.data.path} holds "
                                  f"(the run's was {state['config']['data']['path']}); resume with the run's data or "
                                  "start a new run directory")
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = [group["initial_lr"] for group in configured]
        for group, values, multiplier in zip(self.optimizer.param_groups, configured, self.scheduler.lr_lambdas):
            group.update(values)
            group["lr"] = values["initial_lr"] * multiplier(self.scheduler.last_epoch)
        if self.env.is_main:
            set_aside_later_checkpoints(self.run_dir, state["step"])
        self.step, self.tokens = state["step"], state["tokens"]
        try:
            self.loader.load_state_dict(rank_state["data"])
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from None
        set_rng_state(rank_state["rng"])
        if self.env.is_main:
            print(f"resumed from {path} at step {self.step}")

    def _run_info(self, resumed_from: Path | None) -> dict[str, Any]:
        return {
            "steps": self.budget.steps,
            "grad_accum": self.budget.grad_accum,
            "tokens_per_step": self.budget.tokens_per_step,
            "tokens": self.budget.tokens,
            "forward_flops_per_token": self.budget.forward_flops_per_token,
            "forward_flops": self.budget.flops,
            "parameters": self.module.num_parameters(),
            "non_embedding_parameters": self.module.num_parameters(exclude_embeddings=True),
            "world_size": self.env.world_size,
            "strategy": self.config.run.strategy,
            "device": str(self.env.device),
            "dtype": str(self.autocast.fast_dtype) if isinstance(self.autocast, torch.autocast) else "float32",
            "resumed_from": str(resumed_from) if resumed_from else None,
        }

    # ---------------------------------------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        run = self.config.run
        steps = self.budget.steps
        peak = peak_flops(self.env.device)
        flops_per_token = _flops_per_token(self.model_config, self.config.data.seq_len)
        progress = tqdm(total=steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (run.progress and self.env.is_main))
        validation: dict[str, float] = {}
        checkpoint = None
        loss = None
        self.model.train()
        batches = iter(self.loader)
        with self._stop_signals():
            clock, clock_tokens = time.perf_counter(), self.tokens
            while self.step < steps:
                lr = self.scheduler.get_last_lr()[0]
                metrics = self._train_step(next(batches))
                loss = metrics["loss"]
                self.step += 1
                self.tokens += self.budget.tokens_per_step
                progress.update()
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                if self.step % run.log_every == 0 or self.step == steps:
                    elapsed = time.perf_counter() - clock
                    speed = (self.tokens - clock_tokens) / max(elapsed, 1e-9)
                    record = {"step": self.step, "tokens": self.tokens, **metrics, "lr": lr, "tokens_per_s": speed}
                    if peak is not None:
                        record["mfu"] = flops_per_token * speed / (peak * self.env.world_size)
                    record["peak_memory_gib"] = peak_memory_gib(self.env.device)
                    self.log.log(record)
                    clock, clock_tokens = time.perf_counter(), self.tokens
                if run.eval_every and self.step % run.eval_every == 0 and self.step < steps:
                    validation = self._validate_and_log(progress)
                stop = distributed.any_rank(self._stop_signal is not None, self.env.device)
                if stop or self.step == steps or (run.save_every and self.step % run.save_every == 0):
                    checkpoint = self.save()
                if stop:
                    name = signal.Signals(self._stop_signal).name if self._stop_signal else "a signal on another rank"
                    progress.close()
                    self._print(f"stopped by {name} at step {self.step}; checkpoint {checkpoint}; continue with "
                                "--resume")
                    return TrainResult(self.step, self.tokens, loss, validation, checkpoint, stopped_by=name)
        progress.close()
        if self.val_shards is not None:
            validation = self._validate_and_log(None)
        return TrainResult(self.step, self.tokens, loss, validation, checkpoint or latest_checkpoint(self.run_dir))

    def _train_step(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        accum = self.budget.grad_accum
        world = self.env.world_size
        micro_batches = [dict(zip(batch, parts)) for parts in zip(*(t.split(len(t) // accum) for t in batch.values()))]
        counts = [(mb["labels"][:, 1:] != -100).sum().item() for mb in micro_batches]
        total = distributed.all_reduce_sum(torch.tensor(float(sum(counts)), device=self.env.device)).item()
        if total == 0:
            raise ValueError(f"step {self.step + 1}: the batch has no label tokens; check the data")
        sums: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        for i, mb in enumerate(micro_batches):
            # DDP and FSDP average gradients over ranks; the factor `world` turns that average into the sum of
            # the ranks' token-weighted losses.
            weight = counts[i] * world / total
            mb = {k: v.to(self.env.device, non_blocking=True) for k, v in mb.items()}
            self._set_progress(i)
            with distributed.gradient_sync(self.model, i == accum - 1), self.autocast:
                out = self.model(mb["input_ids"], labels=mb["labels"], document_ids=mb.get("document_ids"),
                                 return_logits=not self.config.run.chunked_loss)
            (out.loss * weight).backward()
            for name, value in {"loss": out.loss, "lm_loss": out.lm_loss, **out.aux_losses}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * weight
            for name, value in out.router_stats.items():
                stats[name] = stats.get(name, 0.0) + value.detach().float() / accum
        names = sorted(sums)
        reduced = distributed.all_reduce_sum(torch.stack([sums[n] for n in names])) / world
        metrics: dict[str, Any] = {n if n in ("loss", "lm_loss") else f"aux/{n}": v for n, v in
                                   zip(names, reduced.tolist())}
        if not math.isfinite(metrics["loss"]):
            self._diverged(f"the loss is {metrics['loss']}")
        grad_norm = clip_gradients(self.optimizer, self.config.optim.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP: a sharded norm
            grad_norm = grad_norm.full_tensor()
        if not math.isfinite(grad_norm.item()):  # a finite loss can still back-propagate inf/NaN
            self._diverged(f"the gradient norm is {grad_norm.item()}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loads = self.module.balancing_loads()
        if loads is not None:  # every rank moves its bias by the loads of all of them, so the biases stay equal
            self.module.update_balancing_bias(distributed.all_reduce_sum(loads.clone()))
        metrics["grad_norm"] = grad_norm.item()
        for name, value in stats.items():  # router statistics of this rank
            metrics[f"router/{name}"] = value.tolist() if value.dim() else value.item()
        return metrics

    # ---------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Mean token NLL on the first ``eval_batches x micro_batch_size`` rows of the validation split (the same
        rows at every evaluation) in each of the model's routing modes (MoRConfig.routing_modes): expert-choice
        models in "topk" (the paper's numbers) and "causal"."""
        if self.val_shards is None:
            return {}
        data, micro, world = self.config.data, self.config.batch.micro_batch_size, self.env.world_size
        # The same rows whatever the number of processes, split evenly (FSDP runs collectives in each forward).
        rows = min(self.config.run.eval_batches * micro, len(self.val_shards) // data.seq_len)
        rows -= rows % world
        if rows == 0:
            raise ValueError(f"the validation split of {data.path} has fewer than {world} rows of {data.seq_len} "
                             "tokens; set data.val_split: null or prepare more validation data")
        results = {}
        self._set_progress()
        self.model.eval()
        for mode in self.model_config.routing_modes:
            nll = torch.zeros(2, device=self.env.device, dtype=torch.float64)
            for batch in sequential_batches(self.val_shards, data.seq_len, micro, max_rows=rows, rank=self.env.rank,
                                            world_size=world, document_masking=data.document_masking,
                                            eos_token_id=data.eos_token_id):
                batch = {k: v.to(self.env.device) for k, v in batch.items()}
                with self.autocast:
                    out = self.model(batch["input_ids"], labels=batch["labels"],
                                     document_ids=batch.get("document_ids"), routing=mode,
                                     return_logits=not self.config.run.chunked_loss)
                count = (batch["labels"][:, 1:] != -100).sum()
                nll += torch.stack([out.lm_loss.double() * count, count.double()])
            total, count = distributed.all_reduce_sum(nll).tolist()
            results["val/nll" + (f"_{mode}" if mode else "")] = total / max(count, 1)
        self.model.train()
        return results

    def _set_progress(self, micro_batch: int = 0) -> None:
        """Tell the model how many training forwards came before this one (the capacity warm-up): the trainer
        owns that count, so it follows the step restored on resume."""
        self.module.set_training_progress(self.step * self.budget.grad_accum + micro_batch)

    def _validate_and_log(self, progress: tqdm | None) -> dict[str, float]:
        results = self.validate()
        if results:
            self.log.log({"step": self.step, "tokens": self.tokens, **results})
            message = f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items())
            if progress is not None and not progress.disable:
                progress.write(message)
            else:
                self._print(message)
        return results

    def _diverged(self, what: str, step: int | None = None) -> NoReturn:
        """Stop before the bad update (or the bad save), naming the step, the last good checkpoint and what to try."""
        self.optimizer.zero_grad(set_to_none=True)
        last = last_good_checkpoint(self.run_dir)
        raise TrainingDiverged(
            f"{what} at step {self.step + 1 if step is None else step} (tokens {self.tokens}); the last good "
            "checkpoint is "
            f"{last or 'none (no checkpoint was saved yet)'}. Lower optim.lr (or raise schedule.warmup), check the "
            "data for corrupt tokens, then resume from that checkpoint with --resume PATH or restart")

    # ---------------------------------------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        trainer_state = {"step": self.step, "tokens": self.tokens, "scheduler": self.scheduler.state_dict(),
                         "tokens_per_step": self.budget.tokens_per_step, "config": self.config.to_dict(),
                         "data_shards": self._data_shards()}
        rank_state = {"data": self.loader.state_dict(), "rng": rng_state()}
        try:
            return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.model_config,
                                   trainer_state, rank_state, self.config.run.keep_last,
                                   tokenizer=Path(self.config.data.path) / TOKENIZER_FILE)
        except BadWeightsError as error:
            self._diverged(f"the parameters are unusable ({error})", step=self.step)

    def _data_shards(self) -> list[str]:
        """What identifies the training tokens: the SHA-256 of each shard (the same data moved or prepared again
        from the same inputs keeps them)."""
        return [shard["sha256"] for shard in self.train_shards.index["splits"][self.train_shards.split]["shards"]]

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGTERM/SIGINT finish the current step, save a checkpoint and stop; a second SIGINT aborts."""
        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum

        try:
            previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _print(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    def close(self) -> None:
        self.log.close()
        self._unlock()
        # Drop what holds the process group (DDP's reducer, FSDP's sharded parameters and optimizer state) while
        # the group still stands: freed after it is destroyed, with another rank already gone, gloo can hang.
        del self.model, self.module, self.optimizer, self.scheduler
        gc.collect()
        distributed.teardown()


def open_data(config: TrainConfig, model_config: MoRConfig, budget: Budget, rank: int = 0,
              world_size: int = 1) -> tuple[PackedBatches, TokenShards | None]:
    """The training loader and validation shards of ``config.data``, after the checks that every run (and
    ``--dry-run``) makes: the data is complete, fits the model's context and vocabulary, and holds a global batch."""
    data = config.data
    if data.seq_len > model_config.max_position_embeddings:
        raise ConfigError(f"data.seq_len: {data.seq_len} exceeds model.max_position_embeddings "
                          f"{model_config.max_position_embeddings}")
    try:
        train_shards = TokenShards(data.path, split=data.train_split)
        val_shards = TokenShards(data.path, split=data.val_split) if data.val_split else None
        loader = PackedBatches(train_shards, data.seq_len, config.batch.micro_batch_size * budget.grad_accum,
                               seed=config.run.seed, rank=rank, world_size=world_size,
                               document_masking=data.document_masking, eos_token_id=data.eos_token_id)
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.path: {error}") from None
    if train_shards.vocab_size > model_config.vocab_size:
        raise ConfigError(f"model.vocab_size: {model_config.vocab_size} is smaller than the "
                          f"{train_shards.vocab_size} tokens of the tokenizer that prepared {data.path}; "
                          f"set model.vocab_size to at least {train_shards.vocab_size}")
    return loader, val_shards


def resume_checkpoint(run_dir: Path, resume: str | Path | None) -> Path | None:
    """The checkpoint a run starts from: None for a fresh run (refused if ``run_dir`` already holds one), the
    latest of ``run_dir`` for ``"latest"`` (None if there is none), else the given checkpoint or run directory."""
    if resume is None:
        if list_checkpoints(run_dir) or (run_dir / METRICS_FILE).is_file():
            raise ConfigError(f"run.out_dir: {run_dir} already holds a run; continue it with --resume or "
                              "choose another run.out_dir")
        return None
    if str(resume) == "latest":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {path}: no such checkpoint or run directory")
    if (path / "checkpoints").is_dir():  # a run directory
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"--resume {path}: the run directory holds no complete checkpoint")
        return found
    return path  # a checkpoint directory, verified when loaded


def _flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token for MFU: the paper's routed count (x3 for the backward pass) plus the LM head,
    which the paper leaves out but the accelerator computes."""
    head = 2.0 * model_config.hidden_size * model_config.vocab_size
    return training_flops_per_token(model_config, seq_len) + 3.0 * head


def _autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _load_initial_weights(model: MoRForCausalLM, directory: str | Path) -> None:
    """Start from the weights of a ``save_pretrained`` folder (e.g. a converted Llama checkpoint)."""
    try:
        source = MoRForCausalLM.from_pretrained(directory)
        model.load_state_dict(source.state_dict())
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        raise ConfigError(f"model.init_from: cannot start from {directory}: {error}") from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(config: TrainConfig, resume: str | Path | None = None) -> TrainResult:
    """Build a :class:`Trainer` for ``config`` and run it to the end of its budget."""
    trainer = Trainer(config, resume)
    try:
        return trainer.train()
    finally:
        trainer.close()
