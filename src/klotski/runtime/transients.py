"""The bytes a forward step holds beside the weights and the KV cache, so budgets can count them.

Under a memory cap the step's transients are what is left once weights and KV cache are counted:
a large group's prefill holds every token's hidden state several times over (each batch's x, the
group's MoE input, the experts' accumulator and the residual), one expert chunk's intermediate
activations, a batch's attention inputs and outputs, and the logits. The store charges this estimate against
the device budget for each group (with the KV cache), and the planner plans with the same figure.
"""

from __future__ import annotations

import torch

from klotski.models.spec import ModelSpec

EXPERT_ROWS = 1024  # tokens per expert matmul: bounds a large prefill's [tokens, intermediate] transients


def step_transient_bytes(
    spec: ModelSpec,
    dtype: torch.dtype,
    group_tokens: int,
    batch_rows: int,
    batch_len: int,
    context: int,
    expert_dtype: torch.dtype | None = None,
) -> int:
    """Upper estimate of one forward step's transient bytes.

    group_tokens: tokens of the whole group in this step (padded); batch_rows, batch_len: the largest
    batch's sequences and new tokens per sequence; context: keys each new token attends to;
    expert_dtype: the experts' compute dtype when it is not `dtype` (their weights upcast in tiles).
    """
    from klotski.layers.linear import tile_bytes

    item = dtype.itemsize
    d, k = spec.hidden_size, max(spec.router.top_k, 1)
    # x per batch, the group's MoE input, base and accumulator (one row per slot beyond two slots)
    hidden = group_tokens * d * item * (3 + (k if k > 2 else 1))
    inter = max(spec.moe_intermediate_size, spec.dense_intermediate_size, spec.shared_intermediate_size)
    rows = min(EXPERT_ROWS, group_tokens)
    # gate, up and act(gate) * up; the chunk's input and output; the upcast tile when experts upcast
    other = expert_dtype or dtype
    expert = rows * (3 * inter + 2 * d) * other.itemsize + rows * d * item
    if expert_dtype is not None and expert_dtype != dtype:
        expert += tile_bytes(max(d, inter), expert_dtype)
    a = spec.attention
    heads = max(a.num_heads, 1)
    tokens = batch_rows * batch_len
    # q, k, v and the output of the batch's new tokens, and its mask; a prefill's fused attention works
    # through the scores in blocks, so they are not held whole, but a decode step's written-out
    # attention (layers/attention.py) holds them: in the compute dtype, in fp32, and cast back
    attention = tokens * heads * (2 * a.qk_head_dim + 2 * a.v_head_dim) * item + tokens * context
    if batch_len == 1:
        attention += tokens * heads * context * (2 * item + 4)
    logits = batch_rows * spec.vocab_size * 4
    return hidden + expert + attention + logits


def charged_transient_bytes(
    spec: ModelSpec,
    dtype: torch.dtype,
    tokens: int,
    sequences: int,
    batch_rows: int,
    batch_len: int,
    context: int,
    capacity: int,
    expert_dtype: torch.dtype | None = None,
) -> int:
    """What a charge for steps of this shape holds: the step's own figure (`tokens` new tokens over
    `sequences`, the largest batch `batch_rows` x `batch_len`, attending `context` keys), and never
    less than a decode step's at `capacity` keys, whose attention scores grow with the context."""
    return max(
        step_transient_bytes(spec, dtype, tokens, batch_rows, batch_len, context, expert_dtype),
        step_transient_bytes(spec, dtype, sequences, batch_rows, 1, capacity),
    )
