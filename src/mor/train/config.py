"""Training configuration: nested dataclasses loaded from YAML and validated field by field.

A config file has the sections ``model``, ``data``, ``optim``, ``schedule``, ``budget``, ``batch`` and ``run``.
Every key is checked against the dataclasses below; an unknown key or a value of the wrong type is an error
that names the key path (``optim.lr: expected float, got str 'abc'``). ``--set a.b=value`` overrides are parsed
as YAML scalars and validated the same way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mor.config import PRESETS, MoRConfig, parse_assignment

STRATEGIES = ("none", "ddp", "fsdp")
SCHEDULES = ("wsd", "cosine", "constant")
DTYPES = ("auto", "float32", "bfloat16")
FLOAT32_MAX = 3.4028234663852886e38


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key path."""


@dataclass
class DataConfig:
    path: str = ""  # directory written by `mor data prepare`
    seq_len: int = 2048
    document_masking: bool = False  # attend only within a document (needs the model's document_ids support)
    train_split: str = "train"
    val_split: str | None = "val"  # None disables validation
    eos_token_id: int | None = None  # document separator; default: the prepared tokenizer's


@dataclass
class OptimConfig:
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # max global gradient norm; None or 0 disables clipping
    aux_router_lr_mult: float = 10.0  # the auxiliary router learns at lr x this (MOR_SPEC 4.6)


@dataclass
class ScheduleConfig:
    kind: str = "wsd"
    warmup: int | float = 0.05  # an int is a number of steps, a float in [0, 1] a fraction of all steps
    decay_fraction: float = 0.2  # wsd: linear decay over this last fraction of the steps
    min_lr_ratio: float | None = None  # final lr / peak lr; default 0 for wsd, 0.1 for cosine


@dataclass
class BudgetConfig:
    """How long to train: exactly one of the three."""

    steps: int | None = None
    tokens: int | None = None
    flops: float | None = None  # forward FLOPs counted the paper's way (mor.model.flops)


@dataclass
class BatchConfig:
    micro_batch_size: int = 8  # sequences per forward pass and rank
    grad_accum: int | None = None  # micro-batches per optimizer step and rank
    global_batch_size: int | None = None  # sequences per optimizer step over all ranks (instead of grad_accum)


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: validate only at the end
    eval_batches: int = 20
    save_every: int = 1000  # 0: save only at the end
    keep_last: int = 3
    # auto: regional on CUDA (a fraction of the compile time, same speed), off on CPU (compiling does not pay back);
    # regional: each layer and the loss on their own (MoRForCausalLM.compile_regions); true: the whole model
    compile: bool | str = "auto"
    chunked_loss: bool = True  # the head and loss a chunk of tokens at a time, never holding the full logits
    dtype: str = "auto"  # auto: bfloat16 autocast on GPU, float32 on CPU
    device: str = "auto"
    strategy: str = "none"  # none | ddp | fsdp (the latter two under torchrun)
    tensorboard: bool = False
    progress: bool = True

    def compile_mode(self, device_type: str) -> str | None:
        """How to ``torch.compile`` the model on a device of this type: "regional", "whole" or not at all."""
        if self.compile == "auto":
            return "regional" if device_type == "cuda" else None
        return "regional" if self.compile == "regional" else "whole" if self.compile else None


@dataclass
class TrainConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def model_config(self) -> MoRConfig:
        """The MoRConfig described by the ``model`` section: a preset plus overrides, every field, or
        ``init_from`` (a ``save_pretrained`` folder whose config.json and weights the run starts from) plus
        overrides that keep the weights' shapes."""
        fields = dict(self.model)
        preset = fields.pop("preset", None)
        init_from = fields.pop("init_from", None)
        try:
            if init_from is not None:
                if preset is not None:
                    raise ConfigError("model: give either preset or init_from, not both")
                config_path = Path(init_from) / "config.json"
                if not config_path.is_file():
                    raise ConfigError(f"model.init_from: {config_path} not found; point it to a folder written by "
                                      "save_pretrained or `mor convert`")
                return MoRConfig.load(config_path).replace(**fields)
            if preset is None:
                return MoRConfig(**fields)
            return MoRConfig.from_preset(preset, **fields)
        except ConfigError:
            raise
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["optim"]["betas"] = list(self.optim.betas)
        return data

    def validate(self) -> None:
        """Cross-field checks that the per-field types cannot express."""
        self.model_config()
        if not self.data.path:
            raise ConfigError("data.path: missing; point it to a directory prepared with `mor data prepare`")
        _positive(self.data.seq_len, "data.seq_len")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr: must be positive, got {self.optim.lr}")
        if self.optim.lr * max(1.0, self.optim.aux_router_lr_mult) > FLOAT32_MAX:  # overflows the float32 update
            raise ConfigError(f"optim.lr: {self.optim.lr:g} (x aux_router_lr_mult {self.optim.aux_router_lr_mult:g}) "
                              f"is beyond float32 (max {FLOAT32_MAX:.4g}); learning rates are usually 1e-4 to 1e-2")
        for i, beta in enumerate(self.optim.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"optim.betas[{i}]: must lie in [0, 1), got {beta}")
        if self.optim.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay: must be non-negative, got {self.optim.weight_decay}")
        if self.optim.grad_clip is not None and self.optim.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip: must be non-negative, got {self.optim.grad_clip}")
        _choice(self.schedule.kind, SCHEDULES, "schedule.kind")
        warmup = self.schedule.warmup
        if isinstance(warmup, float) and not 0.0 <= warmup <= 1.0:
            raise ConfigError(f"schedule.warmup: a float is a fraction of the steps and must lie in [0, 1], got "
                              f"{warmup}; write an integer for a number of steps")
        if isinstance(warmup, int) and warmup < 0:
            raise ConfigError(f"schedule.warmup: must be non-negative, got {warmup}")
        if not 0.0 <= self.schedule.decay_fraction <= 1.0:
            raise ConfigError(f"schedule.decay_fraction: must lie in [0, 1], got {self.schedule.decay_fraction}")
        if self.schedule.min_lr_ratio is not None and not 0.0 <= self.schedule.min_lr_ratio <= 1.0:
            raise ConfigError(f"schedule.min_lr_ratio: must lie in [0, 1], got {self.schedule.min_lr_ratio}")
        given = [name for name in ("steps", "tokens", "flops") if getattr(self.budget, name) is not None]
        if len(given) != 1:
            raise ConfigError(f"budget: give exactly one of steps, tokens, flops (got {given or 'none'})")
        _positive(getattr(self.budget, given[0]), f"budget.{given[0]}")
        _positive(self.batch.micro_batch_size, "batch.micro_batch_size")
        if self.batch.grad_accum is not None and self.batch.global_batch_size is not None:
            raise ConfigError("batch: give grad_accum or global_batch_size, not both")
        for name in ("grad_accum", "global_batch_size"):
            if getattr(self.batch, name) is not None:
                _positive(getattr(self.batch, name), f"batch.{name}")
        for name in ("log_every", "eval_batches", "keep_last"):
            _positive(getattr(self.run, name), f"run.{name}")
        for name in ("eval_every", "save_every"):
            if getattr(self.run, name) < 0:
                raise ConfigError(f"run.{name}: must be non-negative, got {getattr(self.run, name)}")
        if self.run.compile not in (True, False, "auto", "regional"):
            raise ConfigError(f"run.compile: expected true, false, auto or regional, got {self.run.compile!r}")
        _choice(self.run.dtype, DTYPES, "run.dtype")
        _choice(self.run.strategy, STRATEGIES, "run.strategy")

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank."""
        if self.batch.global_batch_size is None:
            return self.batch.grad_accum or 1
        per_step = self.batch.micro_batch_size * world_size
        if self.batch.global_batch_size % per_step:
            raise ConfigError(f"batch.global_batch_size: {self.batch.global_batch_size} sequences are not a multiple "
                              f"of micro_batch_size x world size = {self.batch.micro_batch_size} x {world_size}")
        return self.batch.global_batch_size // per_step


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                steps: int | None = None) -> TrainConfig:
    """Read a YAML training config, apply ``key.path=value`` overrides and validate everything. ``steps``
    replaces the config's budget, whichever kind it is (``mor train --steps N``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    for override in overrides:
        apply_override(data, override)
    if steps is not None:
        data["budget"] = {"steps": steps}
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    config = _build(TrainConfig, data, "")
    config.validate()
    return config


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as a YAML scalar (``1e-3``, ``true``, ``null``)."""
    try:
        key, value = parse_assignment(override)
    except ValueError as error:
        raise ConfigError(f"--set: {error}; e.g. optim.lr=1e-3") from None
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {'.'.join(parts[:depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------- typed building
def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{_join(path, key)}: unknown key; expected one of {', '.join(names)}")
    values = {key: _coerce(value, hints[key], _join(path, key)) for key, value in data.items()}
    if cls is TrainConfig and "model" in values:
        values["model"] = _model_section(values["model"])
    return cls(**values)


def _model_section(section: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(MoRConfig)
    result: dict[str, Any] = {}
    for key, value in section.items():
        if key == "preset":
            if value not in PRESETS:
                raise ConfigError(f"model.preset: unknown preset {value!r}; available: {', '.join(PRESETS)}")
            result[key] = value
        elif key == "init_from":
            if not isinstance(value, str):
                raise ConfigError(f"model.init_from: expected a folder path, got {value!r}")
            result[key] = value
        elif key in hints:
            result[key] = _coerce(value, hints[key], f"model.{key}")
        else:
            raise ConfigError(f"model.{key}: unknown key; expected 'preset', 'init_from' or a MoRConfig field "
                              f"({', '.join(f.name for f in dataclasses.fields(MoRConfig))})")
    return result


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{path}: must not be null")
        options = [a for a in args if a is not type(None)]
        for option in options:  # an exact type match first: `warmup: 5` is an int, `warmup: 0.5` a float
            if _is_exact(value, option):
                return value
        errors = []
        for option in options:
            try:
                return _coerce(value, option, path)
            except ConfigError as error:
                errors.append(str(error))
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{path}: expected {' or '.join(_name(o) for o in options)}, got {_describe(value)}")
    if value is None:
        raise ConfigError(f"{path}: expected {_name(tp)}, got null")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        number = _number(value)
        if number is not None and float(number).is_integer():
            return int(number)
    elif tp is float:
        number = _number(value)
        if number is not None:
            return float(number)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            item_types = args if origin is tuple else [args[0]] * len(value)
            items = [_coerce(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))]
            return tuple(items) if origin is tuple else items
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    raise ConfigError(f"{path}: expected {_name(tp)}, got {_describe(value)}")


def _number(value: Any) -> float | int | None:
    """An int or float, also from strings such as '3e-3' that YAML 1.1 leaves unparsed."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _is_exact(value: Any, tp: Any) -> bool:
    return isinstance(tp, type) and type(value) is tp


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _positive(value: int | float, path: str) -> None:
    if value <= 0:
        raise ConfigError(f"{path}: must be positive, got {value}")


def _choice(value: str, options: tuple[str, ...], path: str) -> None:
    if value not in options:
        raise ConfigError(f"{path}: got {value!r}; expected one of {', '.join(map(repr, options))}")
