"""Model configuration: one dataclass for vanilla, recursive and Mixture-of-Recursions models.

Field names follow Hugging Face's Llama configuration so checkpoints and configs map one to one; the
MoR-specific fields select the sharing strategy, the router and the KV-cache strategy (MOR_SPEC sections 3-7).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SHARING = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTERS = ("none", "expert", "token")
KV_CACHES = ("recursion", "share")
ROUTER_ARCHS = ("linear", "mlp", "wide_mlp")
EXPERT_FUNCS = ("sigmoid", "tanh")
TOKEN_FUNCS = ("softmax", "sigmoid")
EXPERT_SAMPLING = ("aux_loss", "aux_router")
BALANCING = ("loss", "loss_free", "none")
TOKEN_GATING = ("exit", "every")
ROUTING_MODES = ("topk", "causal")
DTYPES = ("float32", "bfloat16", "float16")  # torch dtypes that weights are loaded or written in
# Up-training a vanilla model into a recursive one (mor.interop.recursive): the sharing strategies it supports
# and which original layers initialise the shared block.
RECURSIVE_SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
INITS = ("stepwise", "average", "lower", "upper", "random")

# The paper's base shapes (MOR_SPEC section 2, table "model_arch").
_SMOLLM = dict(vocab_size=49152, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5)
PRESETS: dict[str, dict[str, Any]] = {
    "smollm-135m": dict(_SMOLLM, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3),
    "smollm-360m": dict(_SMOLLM, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                        num_attention_heads=15, num_key_value_heads=5),
    "smollm-730m": dict(_SMOLLM, hidden_size=1536, intermediate_size=4096, num_hidden_layers=26,
                        num_attention_heads=24, num_key_value_heads=8),
    "smollm-1.7b": dict(_SMOLLM, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                        num_attention_heads=32, num_key_value_heads=32),
    # Tiny shapes for tests and the CPU quickstart.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "tiny-8l": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "quickstart": dict(vocab_size=49152, hidden_size=192, intermediate_size=512, num_hidden_layers=8,
                       num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256),
}


@dataclass
class MoRConfig:
    """Configuration of a vanilla, recursive or Mixture-of-Recursions causal language model.

    ``num_hidden_layers`` is the *base* depth. With sharing, the shared block holds
    ``ceil(middle / num_recursions)`` layers (``middle`` excludes the unique first and last layer of the
    middle-* strategies), so layers are added, never dropped, when the middle does not divide
    (MOR_SPEC 3.1: the 30-layer 135M shape with Nr=3 becomes 1+10+1, 32 effective layers).
    """

    # Llama backbone (Hugging Face names).
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = 0
    pad_token_id: int | None = 0

    # Recursion.
    sharing: str = "none"
    num_recursions: int = 1
    kv_cache: str = "recursion"

    # Routing (shared by both routers).
    router: str = "none"
    router_arch: str = "linear"
    router_func: str | None = None  # expert: sigmoid|tanh (default sigmoid); token: softmax|sigmoid (softmax)
    router_alpha: float | None = None  # gate scale; default 0.1, or 1.0 for token-choice softmax
    router_temperature: float = 1.0
    z_loss_coeff: float = 0.0
    random_router: bool = False

    # Expert-choice (MOR_SPEC 4).
    capacities: list[float] | None = None  # default (Nr - r + 1) / Nr
    expert_sampling: str = "aux_loss"
    aux_loss_coeff: float = 0.001
    capacity_warmup_steps: int = 0

    # Token-choice (MOR_SPEC 5).
    balancing: str = "loss"
    balancing_coeff: float = 0.1
    balancing_bias_rate: float = 0.001
    token_gating: str = "exit"

    # Inference-time routing (MOR_SPEC 4.10): a token continues while sigmoid(logit) >= threshold.
    routing_mode_eval: str = "causal"
    causal_threshold: float = 0.5

    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.capacities is not None:
            self.capacities = [float(c) for c in self.capacities]
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_middle(self) -> bool:
        """Middle-* sharing: the first and last layer stay unique, outside the shared block."""
        return self.sharing in ("middle_cycle", "middle_sequence")

    @property
    def is_cycle(self) -> bool:
        """Cycle sharing: each recursion step applies the whole block once, so routers can act between steps
        and the depth can be capped or extended. Sequence sharing repeats single layers in one step."""
        return self.sharing in ("cycle", "middle_cycle")

    @property
    def depth_per_step(self) -> int:
        """Recursion depth that one step of the layer plan counts for: 1 with cycle sharing (and vanilla), every
        recursion with sequence sharing, whose one step repeats each layer ``Nr`` times."""
        return 1 if self.is_cycle else self.num_recursions

    @property
    def routing_modes(self) -> tuple[str | None, ...]:
        """The routing modes in which to evaluate the model: "topk" (the paper's per-sequence selection) and
        "causal" (the per-token decisions of decoding) for expert-choice, the only scheme whose forward depends
        on the mode; ``(None,)`` (the default forward) for every other model."""
        return ROUTING_MODES if self.router == "expert" else (None,)

    @property
    def num_unique_layers(self) -> int:
        """Distinct decoder layers: the shared block plus the unique first/last layers of middle-* sharing."""
        if self.sharing == "none":
            return self.num_hidden_layers
        return self.recursion_block_size + (2 if self.is_middle else 0)

    @property
    def recursion_block_size(self) -> int:
        """Layers in the shared block (B in the paper)."""
        if self.sharing == "none":
            return self.num_hidden_layers
        middle = self.num_hidden_layers - (2 if self.is_middle else 0)
        return math.ceil(middle / self.num_recursions)

    @property
    def num_effective_layers(self) -> int:
        """Unrolled depth: ``B * Nr`` plus the unique first and last layer for middle-* sharing."""
        if self.sharing == "none":
            return self.num_hidden_layers
        return self.recursion_block_size * self.num_recursions + (2 if self.is_middle else 0)

    @property
    def gate_alpha(self) -> float:
        if self.router_alpha is not None:
            return self.router_alpha
        return 1.0 if (self.router == "token" and self.gate_func == "softmax") else 0.1

    @property
    def gate_func(self) -> str:
        if self.router_func is not None:
            return self.router_func
        return "softmax" if self.router == "token" else "sigmoid"

    @property
    def step_capacities(self) -> list[float]:
        """Fraction of the sequence selected at each recursion step (expert-choice)."""
        if self.capacities is not None:
            return list(self.capacities)
        n = self.num_recursions
        return [(n - r + 1) / n for r in range(1, n + 1)]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(name: str, message: str) -> None:
            raise ValueError(f"MoRConfig.{name}: {message}")

        def choice(name: str, options: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in options:
                bad(name, f"got {value!r}; expected one of {', '.join(map(repr, options))}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "num_recursions"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"{self.num_attention_heads} heads do not divide hidden_size "
                f"{self.hidden_size}; pick a divisor such as {_divisors_near(self.hidden_size, self.num_attention_heads)}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"{self.num_key_value_heads} KV heads do not divide "
                f"{self.num_attention_heads} attention heads")
        if self.head_dim % 2:
            bad("hidden_size", f"head dimension {self.head_dim} must be even for rotary embeddings")
        choice("sharing", SHARING)
        choice("router", ROUTERS)
        choice("kv_cache", KV_CACHES)
        choice("router_arch", ROUTER_ARCHS)
        choice("expert_sampling", EXPERT_SAMPLING)
        choice("balancing", BALANCING)
        choice("token_gating", TOKEN_GATING)
        choice("routing_mode_eval", ROUTING_MODES)

        if self.sharing == "none":
            if self.num_recursions != 1:
                bad("num_recursions", f"{self.num_recursions} recursions need parameter sharing; set sharing to "
                    "'middle_cycle' (the paper's choice), 'cycle', 'sequence' or 'middle_sequence'")
            if self.router != "none":
                bad("router", f"router {self.router!r} needs a shared recursion block; set sharing='middle_cycle' "
                    "and num_recursions >= 2")
            if self.kv_cache == "share":
                bad("kv_cache", "recursive KV sharing needs parameter sharing; set sharing to a recursive strategy "
                    "or kv_cache='recursion'")
        else:
            if self.num_recursions < 2:
                bad("num_recursions", f"sharing {self.sharing!r} needs num_recursions >= 2, got {self.num_recursions}")
            middle = self.num_hidden_layers - (2 if self.is_middle else 0)
            if middle < 1:
                bad("num_hidden_layers", f"{self.sharing!r} keeps the first and last layer unique, so it needs at "
                    f"least 3 layers, got {self.num_hidden_layers}")

        if self.router != "none":
            if not self.is_cycle:
                bad("router", f"routing between recursions needs a block that is applied as a whole per step; "
                    f"sharing {self.sharing!r} repeats single layers; use 'middle_cycle' or 'cycle'")
            func = self.gate_func
            allowed = EXPERT_FUNCS if self.router == "expert" else TOKEN_FUNCS
            if func not in allowed:
                bad("router_func", f"{self.router}-choice routers use one of {allowed}, got {func!r}")
            if self.router_temperature <= 0:
                bad("router_temperature", f"must be positive, got {self.router_temperature}")
            if self.z_loss_coeff < 0:
                bad("z_loss_coeff", f"must be non-negative, got {self.z_loss_coeff}")
        if self.router == "expert":
            caps = self.step_capacities
            if len(caps) != self.num_recursions:
                bad("capacities", f"needs one capacity per recursion ({self.num_recursions}), got {len(caps)}")
            if any(not 0.0 < c <= 1.0 for c in caps):
                bad("capacities", f"each capacity must lie in (0, 1], got {caps}")
            if any(b > a for a, b in zip(caps, caps[1:])):
                bad("capacities", f"must be non-increasing (hierarchical filtering), got {caps}; e.g. "
                    f"{[round((self.num_recursions - r) / self.num_recursions, 4) for r in range(self.num_recursions)]}")
            if self.aux_loss_coeff < 0:
                bad("aux_loss_coeff", f"must be non-negative, got {self.aux_loss_coeff}")
            if self.capacity_warmup_steps < 0:
                bad("capacity_warmup_steps", f"must be non-negative, got {self.capacity_warmup_steps}")
        elif self.capacities is not None:
            bad("capacities", "capacities apply to expert-choice routing only (router='expert')")
        if self.router == "token" and self.balancing == "loss_free" and self.balancing_bias_rate <= 0:
            bad("balancing_bias_rate", f"loss-free balancing needs a positive rate, got {self.balancing_bias_rate}")
        if not 0.0 < self.causal_threshold < 1.0:
            bad("causal_threshold", f"must lie strictly between 0 and 1, got {self.causal_threshold}")

    # ------------------------------------------------------------------ constructors and serialisation
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "MoRConfig":
        """A named base shape (``smollm-135m``, ``smollm-360m``, ``smollm-730m``, ``smollm-1.7b``, ``tiny``...)
        with any field overridden, e.g. ``from_preset("smollm-360m", sharing="middle_cycle", num_recursions=3,
        router="expert")``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown MoRConfig field(s) {sorted(unknown)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model_type"] = "mor"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoRConfig":
        data = {k: v for k, v in data.items() if k != "model_type"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MoRConfig field(s) {unknown}; is this a mor config.json?")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "MoRConfig":
        """The config in a ``config.json``; a ValueError naming the file (and the line, for broken JSON) when the
        file is no mor config."""
        data = read_json_object(path, CONFIG_JSON_FIX)
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {' '.join(str(error).split())}") from error

    def replace(self, **changes: Any) -> "MoRConfig":
        return dataclasses.replace(self, **changes)


CONFIG_JSON_FIX = "give the config.json of a mor checkpoint (written by save_pretrained, training or `mor convert`)"
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object (``{...}``) that file ``path`` holds. Anything else is a one-line ValueError that names the
    file, where the JSON breaks, and ``fix`` (what to give instead)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a JSON file (not UTF-8 text); {fix}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                         f"{fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {_JSON_TYPES.get(type(data), type(data).__name__)}, not a JSON object of "
                         f"fields; {fix}")
    return data


def _divisors_near(n: int, k: int) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(divisors, key=lambda d: abs(d - k))[:3]


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (a ``--set`` override) as ``(KEY, value)``, the value parsed as YAML: ``1e-3``, ``true``,
    ``null``, ``[1.0, 0.5]``; an empty value is null."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as error:
        raise ValueError(f"{text!r}: the value is not valid YAML ({getattr(error, 'problem', error)})") from None
