"""Reference checkpoints: tiny transformers models of every supported family and variant.

Each VARIANT is a transformers config; `make_reference` builds the model with seeded random
weights, saves it (hub layout, or transformers' fused in-memory layout) with a tokenizer, and
returns the model for computing reference logits and greedy tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=96,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
    tie_word_embeddings=False,
)


def _mixtral(**kw):
    from transformers import MixtralConfig

    return MixtralConfig(**(COMMON | dict(num_local_experts=4, num_experts_per_tok=2) | kw))


MIXTRAL_VARIANTS = {
    "mixtral": lambda: _mixtral(),
    "mixtral-fused": lambda: _mixtral(),  # saved in transformers' fused-expert layout
    "mixtral-sliding-window": lambda: _mixtral(sliding_window=5),
    "mixtral-top1-tied": lambda: _mixtral(num_experts_per_tok=1, tie_word_embeddings=True),
}


def _variants() -> dict:
    """Every family's variants: name -> config factory (a name ending in -fused saves fused experts)."""
    # The other families' modules import COMMON from this one, so they are imported once it exists.
    from tests import reference_deepseek, reference_qwen_olmoe

    return MIXTRAL_VARIANTS | reference_qwen_olmoe.VARIANTS | reference_deepseek.VARIANTS


VARIANTS = _variants()

# Prompts of different lengths (token ids), shared by every parity test.
PROMPTS = [[0, 17, 42, 99, 5, 300, 12, 7, 8, 250, 33], [0, 400, 3], [0, 1, 2, 3, 4, 5, 6, 7]]


def make_reference(variant: str, out: Path, fused: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0):
    """Build and save one variant; returns the transformers model (eval mode, fp32)."""
    from transformers import AutoModelForCausalLM

    from klotski.tokenizer import write_tokenizer

    config = VARIANTS[variant]()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _perturb_norms(model, seed)
    # Casting round-trips non-persistent buffers (RoPE inv_freq) too: keep them fp32, as a fresh load would.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to(dtype).save_pretrained(out, save_original_format=not fused)
    model.to(torch.float32)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    write_tokenizer(out, config.vocab_size)
    return model


def _perturb_norms(model, seed: int) -> None:
    """Norm weights and biases default to ones/zeros; randomise them so a wrong one shows.

    Buffers too: DeepSeek-V3's e_score_correction_bias is a buffer.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def reference_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len, V] of each prompt, run alone (no padding), in fp32."""
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float() for p in prompts]


def reference_greedy(model, prompts: list[list[int]], new_tokens: int = 16) -> list[list[int]]:
    """transformers' batched greedy generate (left padding), ignoring EOS."""
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=None,
        )
    return out[:, width:].tolist()
