"""Linear layers over weights stored in any dtype; compute happens in the activations' dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from klotski.models.spec import ACTIVATIONS as ACTIVATION_NAMES


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias); a weight stored in another dtype (bf16 on CPU) is upcast transiently.

    Upcasting per matmul keeps resident weights at storage size; on this CPU bf16 weights upcast
    to fp32 ran about twice as fast as bf16 matmul (ARCHITECTURE.md).
    """
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return F.linear(x, weight, bias)


ACTIVATIONS = {name: getattr(F, name) for name in ACTIVATION_NAMES}  # hidden_act -> function


def swiglu_ffn(x: torch.Tensor, w: dict[str, torch.Tensor], act: str, prefix: str = "") -> torch.Tensor:
    """down(act(gate(x)) * up(x)): the expert / shared-expert / dense MLP of every family here."""
    gate = linear(x, w[prefix + "gate_proj"])
    up = linear(x, w[prefix + "up_proj"])
    return linear(ACTIVATIONS[act](gate) * up, w[prefix + "down_proj"])
