"""Routers and the two routing schemes of Mixture-of-Recursions.

Expert-choice (MOR_SPEC 4): before recursion step r a router scores the tokens still active; per sequence the
top ``k_r = floor(c_r * L)`` continue (``topk`` mode, as in training), or, in ``causal`` mode (4.10), every
active token whose ``sigmoid(logit) >= threshold`` continues. Selected tokens are updated with
``H + g * block(H)``, ``g = alpha * sigmoid(logit)``.

Token-choice (MOR_SPEC 5): one router at the first step assigns each token a depth in 1..Nr (argmax).

Both produce *selections*: per row, the indices of the tokens that run a step, sorted by position, padded to a
common length with invalid slots. Ragged selections are therefore dense tensors plus a validity mask, and no
Python loop over the batch is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor.config import MoRConfig


class Router(nn.Module):
    """Linear, MLP (2d hidden, GELU) or wide MLP (4x: ``4d`` hidden, as the paper describes) scorer."""

    def __init__(self, hidden_size: int, out_features: int, arch: str) -> None:
        super().__init__()
        if arch == "linear":
            self.net: nn.Module = nn.Linear(hidden_size, out_features, bias=False)
        else:
            width = hidden_size * (2 if arch == "mlp" else 4)
            self.net = nn.Sequential(
                nn.Linear(hidden_size, width, bias=False), nn.GELU(), nn.Linear(width, out_features, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).float()


@dataclass
class Selection:
    """The tokens that run one recursion step: ``index`` [B, K] into the sequence, sorted by position;
    ``valid`` [B, K] marks real slots (None: all); ``gate`` [B, K] scales the block's output."""

    index: Tensor
    valid: Tensor | None
    gate: Tensor


@dataclass
class RoutingResult:
    losses: dict[str, Tensor] = field(default_factory=dict)  # already weighted by their coefficients
    stats: dict[str, Tensor] = field(default_factory=dict)


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def pack(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Indices [B, K] of the True entries of ``keep`` [B, N] in order, K = the largest row count, and their
    validity. The indices of a row are distinct (a permutation prefix), so scattering back is safe."""
    n = keep.shape[1]
    order = torch.arange(n, device=keep.device)
    key = torch.where(keep, order, order + n)
    if keep.numel() == 0:
        return keep.new_zeros(keep.shape[0], 0, dtype=torch.long), keep.new_zeros(keep.shape[0], 0)
    # At least one slot (an empty attention would not do), so that torch.compile can trace k as a size.
    k = int(keep.sum(1).max().clamp(min=1).item())
    torch._check(k >= 1)
    torch._check(k <= n)
    index = key.argsort(dim=1)[:, :k]
    return index, keep.gather(1, index)


class ExpertChoice(nn.Module):
    """One router per recursion step (plus, optionally, auxiliary routers used only for causal decisions)."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.config = config
        n = config.num_recursions
        d = config.hidden_size
        self.routers = nn.ModuleList(
            [] if config.random_router else [Router(d, 1, config.router_arch) for _ in range(n)]
        )
        use_aux = config.expert_sampling == "aux_router" and not config.random_router
        self.aux_routers = nn.ModuleList([Router(d, 1, config.router_arch) for _ in range(n)] if use_aux else [])
        # Training forwards done so far, which the trainer sets for the capacity warm-up; None: warmed up.
        self.training_progress: int | None = None

    def capacity(self, step: int) -> float:
        """The fraction of tokens step ``step`` selects: ``c_r``, or during the warm-up (MOR_SPEC 4.8) a half
        cosine from 1 down to ``c_r`` over ``capacity_warmup_steps`` training forwards."""
        target = self.config.step_capacities[step]
        return self._warming_up(target) if self.config.capacity_warmup_steps else target

    # Outside torch.compile: a graph that read the progress would be compiled again for every value it takes.
    @torch.compiler.disable
    def _warming_up(self, target: float) -> float:
        warmup, done = self.config.capacity_warmup_steps, self.training_progress
        if done is None or done >= warmup:
            return target
        return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * done / warmup))

    def gate(self, logits: Tensor) -> Tensor:
        act = torch.sigmoid if self.config.gate_func == "sigmoid" else torch.tanh
        return self.config.gate_alpha * act(logits)

    def logits(self, step: int, hidden: Tensor) -> Tensor:
        if self.config.random_router:
            return torch.logit(torch.rand(hidden.shape[:2], device=hidden.device), eps=1e-6)
        return self.routers[step](hidden / self.config.router_temperature).squeeze(-1)

    def aux_logits(self, step: int, hidden: Tensor) -> Tensor:
        """Logits of the auxiliary router of ``step``; it reads detached states and trains only itself."""
        return self.aux_routers[step](hidden.detach() / self.config.router_temperature).squeeze(-1)

    def continues(self, logits: Tensor, aux_logits: Tensor | None) -> Tensor:
        """The causal rule (MOR_SPEC 4.10): a token goes on iff ``sigmoid(logit) >= causal_threshold``, or,
        with an auxiliary router, iff that router's logit is >= 0. It looks at no other token."""
        if aux_logits is not None:
            return aux_logits >= 0
        return logits >= _logit(self.config.causal_threshold)

    def full_capacity(self) -> list[bool]:
        """Per step: whether every active token runs it (capacity 1; step 1 by default)."""
        return [self.capacity(r) >= 1.0 for r in range(self.config.num_recursions)]

    def causal_decision(self, steps: Tensor, hidden: Tensor, full: Tensor) -> tuple[Tensor, Tensor]:
        """Whether each token of ``hidden`` [N, d] runs the step of its router index ``steps`` [N] (0-based,
        one per token: the decoding engine mixes depths in one batch), and the gate it gets there. Tokens at a
        full-capacity step (``full`` [Nr], from :meth:`full_capacity`) always run it; the others follow
        :meth:`continues`."""
        pick = steps[:, None]
        logits = self._every_router(self.routers, hidden).gather(1, pick)[:, 0]
        aux = None
        if self.aux_routers:
            aux = self._every_router(self.aux_routers, hidden.detach()).gather(1, pick)[:, 0]
        return full[steps] | self.continues(logits, aux), self.gate(logits)

    def _every_router(self, routers: nn.ModuleList, hidden: Tensor) -> Tensor:
        """Logits [N, Nr] of every router on every token; linear routers as one reduction (with their biases,
        where a router was given one, e.g. to calibrate its exits). A reduction rather than a matrix product: with
        a handful of outputs a product runs as a general GEMM kernel (8 µs per call on an H200 in the decoding
        engine), where compiled code can fuse a reduction with its neighbours."""
        x = hidden / self.config.router_temperature
        if not all(isinstance(r.net, nn.Linear) for r in routers):
            return torch.stack([r(x).squeeze(-1) for r in routers], -1)
        weight = torch.cat([r.net.weight for r in routers])
        logits = (x[..., None, :] * weight).sum(-1).float()
        if any(r.net.bias is not None for r in routers):
            logits = logits + torch.cat([r.net.weight.new_zeros(1) if r.net.bias is None else r.net.bias
                                         for r in routers]).float()
        return logits

    @staticmethod
    def gated_update(gate: Tensor, block_out: Tensor) -> Tensor:
        """The increment of ``H <- H + g * f(H)`` (MOR_SPEC 4.5) for block outputs ``block_out`` [..., d]."""
        return gate[..., None] * block_out

    def select(
        self,
        step: int,
        hidden: Tensor,
        candidates: Tensor,
        candidates_valid: Tensor | None,
        seq_len: int,
        row_lengths: Tensor | None,
        mode: str,
        result: RoutingResult,
    ) -> Selection:
        """Choose, among the ``candidates`` [B, N] (active token indices, their hidden states ``hidden``
        [B, N, d]), the tokens that run step ``step`` (0-based). ``k = floor(capacity * L)`` uses the full
        row length L (``seq_len``, or the real tokens of each row, ``row_lengths``, when there is padding)."""
        logits = self.logits(step, hidden)
        aux_logits = self.aux_logits(step, hidden) if self.aux_routers else None
        num = candidates.shape[1]
        capacity = self.capacity(step)

        if capacity >= 1.0:  # every active token runs this step (step 1 by default)
            chosen = torch.arange(num, device=hidden.device).expand_as(candidates)
            chosen_valid = candidates_valid
        elif mode == "topk":
            if row_lengths is None:  # no padding: the same k for every row, no host sync
                k = max(1, math.floor(capacity * seq_len + 1e-9))
                chosen = logits.topk(k, dim=1).indices.sort(dim=1).values
                chosen_valid = None
            else:
                k_rows = (row_lengths.double() * capacity + 1e-9).floor().long().clamp(min=1)
                k_rows = torch.minimum(k_rows, row_lengths)
                scores = logits.masked_fill(~candidates_valid, float("-inf"))
                top = scores.topk(int(k_rows.max().item()), dim=1).indices
                top_valid = torch.arange(top.shape[1], device=top.device) < k_rows[:, None]
                keep = torch.zeros_like(candidates_valid).scatter(1, top, top_valid)
                chosen, chosen_valid = pack(keep)
        else:  # causal: a per-token decision that never looks at other tokens
            keep = self.continues(logits, aux_logits)
            if candidates_valid is not None:
                keep = keep & candidates_valid
            chosen, chosen_valid = pack(keep)

        selected = torch.zeros_like(logits, dtype=torch.bool).scatter(
            1, chosen, True if chosen_valid is None else chosen_valid
        )
        self._losses_and_stats(step, logits, aux_logits, selected, candidates_valid, result)
        index = candidates.gather(1, chosen)
        return Selection(index, chosen_valid, self.gate(logits.gather(1, chosen)))

    def _losses_and_stats(
        self,
        step: int,
        logits: Tensor,
        aux_logits: Tensor | None,
        selected: Tensor,
        valid: Tensor | None,
        result: RoutingResult,
    ) -> None:
        cfg = self.config
        target = selected.float()
        if self.training and not cfg.random_router:  # auxiliary losses only train; eval forwards skip them
            if cfg.expert_sampling == "aux_loss" and cfg.aux_loss_coeff > 0:
                bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
                _accumulate(result.losses, "router_bce", cfg.aux_loss_coeff * _masked_mean(bce, valid))
            if aux_logits is not None:
                bce = F.binary_cross_entropy_with_logits(aux_logits, target, reduction="none")
                _accumulate(result.losses, "aux_router_bce", _masked_mean(bce, valid))
            if cfg.z_loss_coeff > 0:
                _accumulate(result.losses, "router_z", cfg.z_loss_coeff * _masked_mean(logits.pow(2), valid))
        with torch.no_grad():
            agree = (self.continues(logits, aux_logits) == selected).float()
            result.stats[f"sampling_accuracy/step{step + 1}"] = _masked_mean(agree, valid)
            result.stats[f"selected_fraction/step{step + 1}"] = _masked_mean(selected.float(), valid)


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _accumulate(losses: dict[str, Tensor], name: str, value: Tensor) -> None:
    losses[name] = losses[name] + value if name in losses else value


class TokenChoice(nn.Module):
    """One router that assigns each token its number of recursion steps (MOR_SPEC 5)."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.config = config
        n = config.num_recursions
        self.router = None if config.random_router else Router(config.hidden_size, n, config.router_arch)
        # Loss-free balancing (not trained by gradients): a per-depth bias for the argmax only, and the loads
        # counted since the last update.
        self.register_buffer("balancing_bias", torch.zeros(n))
        self.register_buffer("load_counts", torch.zeros(n))

    def assign(self, hidden: Tensor, valid: Tensor | None, result: RoutingResult) -> tuple[Tensor, Tensor]:
        """Depth in 1..Nr (0 for padding) and gate of every token of ``hidden`` [B, T, d]."""
        cfg = self.config
        n = cfg.num_recursions
        if self.router is None:
            depth = torch.randint(1, n + 1, hidden.shape[:2], device=hidden.device)
            gate = torch.full(hidden.shape[:2], 1.0 / n, device=hidden.device)
        else:
            logits = self.router(hidden / cfg.router_temperature)
            if cfg.gate_func == "softmax":
                probs = logits.softmax(-1)
            else:
                probs = torch.sigmoid(logits)
            scored = probs + self.balancing_bias if cfg.balancing == "loss_free" else probs
            choice = scored.argmax(-1)
            depth = choice + 1
            gate = cfg.gate_alpha * probs.gather(-1, choice[..., None]).squeeze(-1)
            self._losses_and_stats(logits, probs, choice, valid, result)
        if valid is not None:
            depth = depth.masked_fill(~valid, 0)
        return depth, gate

    def _losses_and_stats(
        self, logits: Tensor, probs: Tensor, choice: Tensor, valid: Tensor | None, result: RoutingResult
    ) -> None:
        cfg = self.config
        n = cfg.num_recursions
        weights = torch.ones_like(choice, dtype=probs.dtype) if valid is None else valid.to(probs.dtype)
        total = weights.sum().clamp(min=1)
        counts = (F.one_hot(choice, n).to(probs.dtype) * weights[..., None]).sum((0, 1))
        mean_probs = (probs * weights[..., None]).sum((0, 1)) / total
        if self.training and cfg.balancing == "loss" and cfg.balancing_coeff > 0:
            # L_bal = sum_i f_i P_i, f_i = (Nr / T) * #tokens assigned to depth i, P_i = mean probability.
            result.losses["balancing"] = cfg.balancing_coeff * (n * counts.detach() / total * mean_probs).sum()
        if self.training and cfg.z_loss_coeff > 0:
            z = torch.logsumexp(logits, dim=-1).pow(2)
            result.losses["router_z"] = cfg.z_loss_coeff * (z * weights).sum() / total
        if self.training and cfg.balancing == "loss_free":
            self.load_counts += counts.detach()
        with torch.no_grad():
            load = counts / total
            result.stats["load"] = load
            result.stats["max_violation"] = (load.max() - load.mean()) / load.mean()
            p = mean_probs / mean_probs.sum()
            result.stats["entropy"] = -(p * p.clamp(min=1e-12).log()).sum()

    def widen(self, depth: Tensor, num_steps: int | Tensor) -> Tensor:
        """Depths for ``num_steps`` recursion steps (one count, or one per token): fewer than trained cap the
        depth; with more (extra recursions) the tokens assigned the deepest trained step run every extra one as
        well (test-time depth scaling)."""
        steps = torch.as_tensor(num_steps, device=depth.device)
        depth = torch.minimum(depth, steps)
        return torch.where((depth == self.config.num_recursions) & (steps > self.config.num_recursions), steps, depth)

    def step_output(self, first: Tensor, block_out: Tensor, gate: Tensor, exits: Tensor) -> Tensor:
        """The new hidden state after a step: at the token's last step (``exits``) ``H^1 + g * f(H^r)``, before
        it the block output (the official code) or ``g * f(H^r)`` (paper eq. 2, ``token_gating="all"``)."""
        gated = gate[..., None].to(block_out.dtype) * block_out
        keep = block_out if self.config.token_gating == "exit" else gated
        return torch.where(exits[..., None], first + gated, keep)

    @torch.no_grad()
    def update_balancing_bias(self, load_counts: Tensor) -> None:
        """Loss-free balancing step: ``b_i += u * sign(mean load - load_i)`` from ``load_counts`` (the tokens
        routed to each depth since the last update), then reset this module's counts."""
        total = load_counts.sum()
        if total > 0:
            load = load_counts / total
            self.balancing_bias += self.config.balancing_bias_rate * torch.sign(load.mean() - load)
        self.load_counts.zero_()
