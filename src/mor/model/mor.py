"""MoRForCausalLM: one model class for vanilla, recursive and Mixture-of-Recursions language models.

Forward pass (MOR_SPEC 14): embed -> prelude (unique first layer of middle-* sharing) -> the shared block,
applied once per recursion step to the tokens routed there -> coda (unique last layer) -> norm -> tied head.

Every recursion step runs on a *gathered* dense batch of only the tokens it processes, with rotary angles at
their original positions, so the FLOP and memory savings of routing are real (DESIGN decision 3). Attention
at a step sees only the tokens of that step (recursion-wise caching) or, with ``kv_cache="share"``, the
keys/values that the first application of the same layer computed for every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor.config import ROUTING_MODES, MoRConfig
from mor.integrity import verify_manifest
from mor.model import io
from mor.model.kv_cache import KVCache
from mor.model.layers import KV, DecoderLayer, RMSNorm, RotaryEmbedding, TokenLayout, allowed_attention
from mor.model.loss import linear_cross_entropy
from mor.model.routing import ExpertChoice, RoutingResult, Selection, TokenChoice, pack
from mor.model.sharing import LayerPlan, layer_plan

if TYPE_CHECKING:
    from mor.infer.generate import GenerationOutput


@dataclass
class MoROutput:
    logits: Tensor | None  # None when the loss was taken without them (``return_logits=False``)
    loss: Tensor | None = None
    lm_loss: Tensor | None = None
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    depths: Tensor | None = None  # [B, T] recursion steps each token ran
    router_stats: dict[str, Tensor] = field(default_factory=dict)


class MoRModel(nn.Module):
    """The decoder stack without the language-model head."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.config = config
        self.plan: LayerPlan = layer_plan(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # Distinct layers only: an unrolled position that shares weights runs the very same module, so every
        # weight of the shared block (attention, MLP, norms) is tied across recursions.
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_unique_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.expert = ExpertChoice(config) if config.router == "expert" else None
        self.token = TokenChoice(config) if config.router == "token" else None

    def unrolled_layer(self, position: int) -> DecoderLayer:
        return self.layers[self.plan.layer_of[self.base_position(position)]]

    def base_position(self, position: int) -> int:
        """Positions past the plan are extra recursion steps (test-time depth scaling): they run the layers of
        the last step again, in order, with their own keys/values."""
        if position < self.plan.num_positions:
            return position
        last = self.plan.steps[-1]
        return last[(position - self.plan.num_positions) % len(last)]

    def extra_steps(self, extra_recursions: int) -> tuple[tuple[int, ...], ...]:
        """Unrolled positions of ``extra_recursions`` applications of the block after the last trained one."""
        first, size = self.plan.num_positions, len(self.plan.steps[-1])
        return tuple(tuple(range(first + e * size, first + (e + 1) * size)) for e in range(extra_recursions))

    def recursion_steps(self, max_recursions: int | None = None,
                        extra_recursions: int = 0) -> tuple[tuple[int, ...], ...]:
        """Unrolled positions of each recursion step a forward runs: all trained steps, the first
        ``max_recursions`` of them, or ``extra_recursions`` more (test-time depth). A block that is not applied
        as a whole per step (sequence sharing) has one step, which ``max_recursions`` does not cut."""
        cycles = self.config.is_cycle
        if max_recursions is not None and max_recursions < 1:
            raise ValueError(f"max_recursions must be at least 1, got {max_recursions}")
        if extra_recursions:
            if extra_recursions < 0 or not cycles:
                raise ValueError(f"extra_recursions={extra_recursions}: needs a non-negative count and a block "
                                 f"applied as a whole per step (sharing 'cycle' or 'middle_cycle', "
                                 f"got {self.config.sharing!r})")
            if max_recursions is not None:
                raise ValueError("give either max_recursions (fewer steps) or extra_recursions (more), not both")
        steps = self.plan.steps[:max_recursions] if max_recursions is not None and cycles else self.plan.steps
        return steps + self.extra_steps(extra_recursions)

    def kv_position(self, position: int) -> int:
        """The position whose keys/values ``position`` attends to: its own, or with recursive KV sharing those of
        the first position that runs the same layer."""
        if self.config.kv_cache != "share":
            return position
        return self.plan.kv_source(self.base_position(position))

    def cache_positions(self, extra_recursions: int = 0) -> list[int]:
        """The unrolled positions that store keys/values in a decoding cache."""
        total = self.plan.num_positions + extra_recursions * len(self.plan.steps[-1])
        return [p for p in range(total) if self.kv_position(p) == p]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        routing: str = "topk",
        max_recursions: int | None = None,
        cache: KVCache | None = None,
        extra_recursions: int = 0,
    ) -> tuple[Tensor, Tensor, RoutingResult]:
        """Final hidden states [B, T, d], recursion depth per token [B, T] and routing losses/statistics.

        With ``cache`` the tokens continue the rows cached so far (decoding): every layer stores their keys/values
        there and attends to all cached ones."""
        batch, seq_len = input_ids.shape
        layout = _input_layout(input_ids, attention_mask, document_ids)
        if cache is not None:
            layout = cache.extend(layout)
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary(layout.positions, hidden.dtype)
        mask = allowed_attention(layout, layout)
        result = RoutingResult()
        kvs: dict[int, tuple[KV, TokenLayout]] = {}

        for position in self.plan.prelude:
            hidden = self._run(position, hidden, rope, mask, layout, kvs, cache)

        steps = self.recursion_steps(max_recursions, extra_recursions)
        if self.expert is not None:
            hidden, depths = self._expert_steps(hidden, layout, steps, routing, kvs, result, cache)
        elif self.token is not None:
            hidden, depths = self._token_steps(hidden, layout, steps, kvs, result, cache)
        else:
            for step in steps:
                for position in step:
                    hidden = self._run(position, hidden, rope, mask, layout, kvs, cache)
            depth = len(steps) * self.config.depth_per_step
            depths = torch.full((batch, seq_len), depth, dtype=torch.long, device=input_ids.device)
            if layout.valid is not None:
                depths = depths.masked_fill(~layout.valid, 0)

        for position in self.plan.coda:
            hidden = self._run(position, hidden, rope, mask, layout, kvs, cache)
        return self.norm(hidden), depths, result

    def _run(
        self,
        position: int,
        hidden: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        layout: TokenLayout,
        kvs: dict[int, tuple[KV, TokenLayout]],
        cache: KVCache | None = None,
    ) -> Tensor:
        """Run one unrolled position; with KV sharing, positions after the first reuse its keys/values."""
        layer = self.unrolled_layer(position)
        source = self.kv_position(position)
        if cache is not None:
            if source == position:
                return layer(hidden, rope, mask, cache=cache.updater(position, layout))[0]
            kv, source_layout = cache.read(source)
            return layer(hidden, rope, allowed_attention(layout, source_layout), kv)[0]
        if source != position:
            kv, source_layout = kvs[source]
            hidden, _ = layer(hidden, rope, allowed_attention(layout, source_layout), kv)
        else:
            hidden, kv = layer(hidden, rope, mask)
            if self.config.kv_cache == "share":
                kvs[position] = (kv, layout)
        return hidden

    def _run_step(
        self,
        step: tuple[int, ...],
        hidden: Tensor,
        layout: TokenLayout,
        selection: Selection,
        kvs: dict[int, tuple[KV, TokenLayout]],
        cache: KVCache | None = None,
    ) -> Tensor:
        """Gather the selected tokens, run the block on them and return the block output [B, K, d]."""
        index = selection.index
        x = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        sub_layout = layout.gather(index, selection.valid)
        rope = self.rotary(sub_layout.positions, x.dtype)
        mask = allowed_attention(sub_layout, sub_layout)
        for position in step:
            x = self._run(position, x, rope, mask, sub_layout, kvs, cache)
        return x

    def _expert_steps(
        self,
        hidden: Tensor,
        layout: TokenLayout,
        steps: tuple[tuple[int, ...], ...],
        routing: str,
        kvs: dict[int, tuple[KV, TokenLayout]],
        result: RoutingResult,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        assert self.expert is not None
        last_router = self.config.num_recursions - 1  # extra recursions reuse the last step's router
        batch, seq_len, dim = hidden.shape
        candidates = torch.arange(seq_len, device=hidden.device).expand(batch, seq_len)
        candidates_valid = layout.valid
        row_lengths = None if layout.valid is None else layout.valid.sum(1)
        depths = torch.zeros(batch, seq_len, dtype=torch.long, device=hidden.device)
        for r, step in enumerate(steps):
            expand = candidates[..., None].expand(-1, -1, dim)
            selection = self.expert.select(
                min(r, last_router), hidden.gather(1, expand), candidates, candidates_valid, seq_len, row_lengths,
                routing, result,
            )
            out = self._run_step(step, hidden, layout, selection, kvs, cache)
            gate = selection.gate if selection.valid is None else selection.gate * selection.valid
            index = selection.index[..., None].expand(-1, -1, dim)
            hidden = hidden.scatter_add(1, index, self.expert.gated_update(gate, out).to(hidden.dtype))
            ran = torch.ones_like(selection.index) if selection.valid is None else selection.valid.long()
            depths = depths.scatter_add(1, selection.index, ran)
            candidates, candidates_valid = selection.index, selection.valid
        with torch.no_grad():
            reached_last = (depths == len(steps)).any(0).float()
            real = torch.ones(seq_len, device=hidden.device) if layout.valid is None else layout.valid.any(0).float()
            result.stats["dead_token_ratio"] = 1 - (reached_last * real).sum() / real.sum().clamp(min=1)
        return hidden, depths

    def _token_steps(
        self,
        hidden: Tensor,
        layout: TokenLayout,
        steps: tuple[tuple[int, ...], ...],
        kvs: dict[int, tuple[KV, TokenLayout]],
        result: RoutingResult,
        cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor]:
        assert self.token is not None
        dim = hidden.shape[-1]
        depths, gate = self.token.assign(hidden, layout.valid, result)
        depths = self.token.widen(depths, len(steps))
        first = hidden  # H^1, the input of the recursion block
        for r, step in enumerate(steps, start=1):
            index, valid = pack(depths >= r)
            selection = Selection(index, valid, gate.gather(1, index))
            out = self._run_step(step, hidden, layout, selection, kvs, cache)
            expand = index[..., None].expand(-1, -1, dim)
            exits = depths.gather(1, index) == r
            step_out = self.token.step_output(first.gather(1, expand), out, selection.gate, exits)
            step_out = torch.where(valid[..., None], step_out, hidden.gather(1, expand))
            hidden = hidden.scatter(1, expand, step_out)
        return hidden, depths


def _input_layout(input_ids: Tensor, attention_mask: Tensor | None, document_ids: Tensor | None) -> TokenLayout:
    batch, seq_len = input_ids.shape
    if attention_mask is None or bool(attention_mask.all()):
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        return TokenLayout(positions, None, document_ids)
    valid = attention_mask.bool()
    # Left- or right-padded rows: real tokens are numbered from 0 in each row.
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    return TokenLayout(positions, valid, document_ids)


def next_token_loss(hidden: Tensor, head: Tensor, logits: Tensor | None, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of ``logits`` [B, T, V] against ``labels`` [B, T]; without ``logits``, of the head
    ``head`` [V, d] over ``hidden`` [B, T, d], a chunk of tokens at a time."""
    targets = labels[:, 1:].flatten()
    if logits is None:
        return linear_cross_entropy(hidden[:, :-1].flatten(0, 1), head, targets)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100)


class MoRForCausalLM(nn.Module):
    """Causal language model; ``model(input_ids, labels=...)`` returns a :class:`MoROutput`."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MoRModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._next_token_loss = next_token_loss  # compiled on its own by compile_regions

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        document_ids: Tensor | None = None,
        routing: str | None = None,
        max_recursions: int | None = None,
        cache: KVCache | None = None,
        extra_recursions: int = 0,
        return_logits: bool = True,
    ) -> MoROutput:
        """``routing``: "topk" (per-sequence top-k, the paper's forward; the default in training) or "causal"
        (per-token threshold decisions, the default in ``eval()``, so no logit depends on a later token).
        ``return_logits=False`` with ``labels`` takes the loss a chunk of tokens at a time
        (:func:`mor.model.loss.linear_cross_entropy`): the same loss and gradients without the full logits.

        ``max_recursions`` caps the depth; ``extra_recursions`` applies the block that many more times after the
        last trained step to the tokens that reach it (test-time depth scaling; the last router decides).
        ``cache`` (a :mod:`mor.model.kv_cache` cache) continues cached rows, e.g. one token at a time."""
        if routing is None:
            routing = "topk" if self.training else self.config.routing_mode_eval
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {routing!r}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        self.model.recursion_steps(max_recursions, extra_recursions)  # clear errors before any work
        if cache is not None and routing == "topk" and self.config.router != "none":
            raise ValueError("a KV cache continues sequences token by token, which needs routing='causal' "
                             "(per-sequence top-k looks at later tokens)")

        hidden, depths, routed = self.model(input_ids, attention_mask, document_ids, routing, max_recursions,
                                            cache, extra_recursions)
        logits = self.lm_head(hidden) if return_logits or labels is None else None
        out = MoROutput(logits=logits, aux_losses=routed.losses, depths=depths, router_stats=routed.stats)
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask == 0, -100)
            out.lm_loss = self._next_token_loss(hidden, self.lm_head.weight, logits, labels)
            out.loss = out.lm_loss + sum(routed.losses.values(), torch.zeros((), device=hidden.device))
        return out

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` the model in place (arguments as ``nn.Module.compile``). Token-choice packing reads a
        data-dependent token count; ``capture_scalar_outputs`` (a process-wide Dynamo setting, turned on here)
        traces it as a size, so the whole forward stays one graph."""
        torch._dynamo.config.capture_scalar_outputs = True
        super().compile(*args, **kwargs)

    def compile_regions(self, **kwargs: Any) -> None:
        """Regional compilation: ``torch.compile`` each decoder layer on its own, and the head with the loss.
        The layers share their code, so one layer is compiled (once per attention form: causal, or masked for
        gathered tokens) however deep the model; routing, gathers and scatters between them run eagerly. Compiles
        in a fraction of the whole model's time. The layer's code is compiled once per form it meets (training or
        evaluation, with or without gradients, causal or masked, static or dynamic lengths): a token-choice model
        with KV sharing reaches 8, Dynamo's default limit, past which it would run eagerly without a word, so the
        limit is raised to 32 for this process."""
        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # older PyTorch
        setattr(config, limit, max(getattr(config, limit), 32))
        for layer in self.model.layers:
            layer.compile(**kwargs)
        self._next_token_loss = torch.compile(next_token_loss, **kwargs)

    # ------------------------------------------------------------------ routers (upkept by the training loop)
    def set_training_progress(self, forwards: int | None) -> None:
        """Training forward passes (micro-batches) done so far, which set the expert-choice capacities during the
        warm-up (``capacity_warmup_steps``); the trainer calls it before each forward. None, the default, means
        warmed up: the configured capacities. No-op for other models."""
        if self.model.expert is not None:
            self.model.expert.training_progress = forwards

    def balancing_loads(self) -> Tensor | None:
        """The tokens routed to each depth in training forwards since the last :meth:`update_balancing_bias`
        (loss-free token-choice balancing), or None for other models."""
        if self.model.token is None or self.config.balancing != "loss_free":
            return None
        return self.model.token.load_counts

    def update_balancing_bias(self, loads: Tensor | None = None) -> None:
        """Loss-free balancing update (token-choice); call after each optimizer step with ``loads``, the
        :meth:`balancing_loads` summed over every process (default: this process's). No-op for other models."""
        own = self.balancing_loads()
        if own is not None:
            self.model.token.update_balancing_bias(own if loads is None else loads)

    def aux_router_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the auxiliary routers (trained only by their own BCE; own optimizer settings)."""
        if self.model.expert is not None:
            yield from self.model.expert.aux_routers.parameters()

    # ------------------------------------------------------------------ generation
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> "GenerationOutput":
        """``mor.infer.generate.generate(self, ...)``, the familiar ``model.generate()``: decode with KV caches and
        causal routing. Arguments and result as :func:`mor.infer.generate.generate` (``max_new_tokens``,
        ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``, ``stop_strings`` + ``tokenizer``,
        ``seed``, ``streamer``, ``max_recursions``, ``extra_recursions``). Decoding lives in :mod:`mor.infer`, which
        builds on the model; this delegation is the model's only reference to it, imported when called."""
        from mor.infer.generate import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    # ------------------------------------------------------------------ accounting
    def num_parameters(self, exclude_embeddings: bool = False, unique: bool = True) -> int:
        """Parameter count. ``unique=False`` counts a shared layer once per unrolled position it runs at."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields each tied tensor once
        if not unique:
            per_layer = sum(p.numel() for p in self.model.layers[0].parameters())
            total += per_layer * (self.model.plan.num_positions - len(self.model.layers))
        if exclude_embeddings:
            total -= self.model.embed_tokens.weight.numel()
            if not self.config.tie_word_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (tied tensors stored once; see :mod:`mor.model.io`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        io.save_model_files(directory, self.config, self.state_dict(), io.tied_parameter_names(self))

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu", dtype: torch.dtype | None = None,
        verify: bool = True,
    ) -> "MoRForCausalLM":
        """Load a ``save_pretrained`` folder (or a training checkpoint). When the folder has a ``manifest.json``,
        the files are first checked against its checksums; ``verify=False`` skips that (it reads every byte once
        more, which takes a while for very large files). Weights holding NaN or infinities are refused."""
        directory = Path(directory)
        io.require_model_files(directory)
        if verify:
            verify_manifest(directory, (io.CONFIG_FILE, io.WEIGHTS_FILE))
        model = cls(io.load_config(directory))
        model.load_state_dict(io.load_weights(directory, model, map_location))
        model.to(map_location)
        if dtype is not None:
            model.to(dtype)
        return model
