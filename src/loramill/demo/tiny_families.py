"""Tiny causal language models of the families users fine-tune (issue #33), built offline:
LLaMA (the embedded model's; Llama 3.x's rope scaling too), Mistral, Qwen2, Qwen3, Gemma 2 and
Gemma 3, each transformers'
own architecture at test size with seeded random weights, and the embedded model's byte-level
BPE tokenizer (loramill.demo.tiny_llama), whose chat template the text stages apply.

What sets each family apart is kept: grouped-query attention (fewer key/value heads than
query heads), Qwen2's q/k/v biases, Qwen3's q/k norms, Gemma's soft-capped logits, scaled
embeddings and tied input / output embeddings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loramill.demo.tiny_llama import build_causal_lm, build_tokenizer

# family → (transformers config class, model class, what the family's config sets apart)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    # Llama 3.x's rope scaling; its original context shrunk to 64 positions, so the tiny head's
    # 8 rotary frequencies fall on both sides of the blend (kept, blended, divided)
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }}),
    # sliding_window off, as Mistral 7B v0.2 onwards
    "mistral": ("MistralConfig", "MistralForCausalLM",
                {"num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {
        "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
        "sliding_window": 4096, "tie_word_embeddings": True,
    }),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {
        "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
        "sliding_window": 4096, "tie_word_embeddings": True,
    }),
}  # fmt: skip


def build_family_model(
    family: str, tokenizer: Any, seed: int = 0, hidden: int = 64, layers: int = 2,
    init_std: float = 0.25,
) -> Any:  # fmt: skip
    """A ``family`` model sized for tests, seeded random weights (build_causal_lm)."""
    config_class, model_class, own = FAMILIES[family]
    return build_causal_lm(config_class, model_class, tokenizer, seed, hidden, layers,
                           init_std, **own)  # fmt: skip


def write_family_model(
    family: str, out: str | os.PathLike, texts: list[str], seed: int = 0
) -> Path:
    """A ``family`` model folder at ``out`` (safetensors, config, tokenizer) whose tokenizer is
    trained on ``texts``."""
    tokenizer = build_tokenizer(texts)
    model = build_family_model(family, tokenizer, seed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return Path(out)
