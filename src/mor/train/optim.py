"""AdamW with the paper's parameter groups.

Weight decay follows Hugging Face's grouping used by the released code's Accelerate path (MOR_SPEC 9.2): matrices
and embeddings decay; vectors (RMSNorm gains, biases) do not. The auxiliary router (MOR_SPEC 4.6) gets its own
groups at ``lr x aux_router_lr_mult``; it only receives gradients from its own BCE loss, so it is clipped apart
from the rest of the model (as in the released trainer).
"""

from __future__ import annotations

import torch
from torch import nn

from mor.train.config import OptimConfig


def parameter_groups(model: nn.Module, aux_router_params: list[nn.Parameter],
                     config: OptimConfig) -> list[dict]:
    aux_ids = {id(p) for p in aux_router_params}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for param in model.parameters():  # deduplicated, so tied weights appear once
        if not param.requires_grad:
            continue
        key = (id(param) in aux_ids, param.ndim >= 2)
        groups.setdefault(key, []).append(param)
    result = []
    for (is_aux, decay), params in sorted(groups.items()):
        result.append({
            "params": params,
            "lr": config.lr * (config.aux_router_lr_mult if is_aux else 1.0),
            "weight_decay": config.weight_decay if decay else 0.0,
            "name": ("aux_router" if is_aux else "model") + ("" if decay else "_no_decay"),
        })
    return result


def build_optimizer(model: nn.Module, aux_router_params: list[nn.Parameter], config: OptimConfig,
                    device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, aux_router_params, config), lr=config.lr,
                             betas=config.betas, eps=config.eps, fused=device.type == "cuda")


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
    """Clip the model's and the auxiliary router's gradients separately; return the model's gradient norm."""
    limit = max_norm if max_norm else float("inf")
    model_params = [p for g in optimizer.param_groups if not g["name"].startswith("aux_router") for p in g["params"]]
    aux_params = [p for g in optimizer.param_groups if g["name"].startswith("aux_router") for p in g["params"]]
    if aux_params:
        torch.nn.utils.clip_grad_norm_(aux_params, limit)
    return torch.nn.utils.clip_grad_norm_(model_params, limit)
