"""A tiny LLaMA-architecture language model and its tokenizer, built offline.

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on given text
(byte-level: any input encodes, nothing is unknown); the model is transformers'
LlamaForCausalLM at a few hundred thousand parameters with seeded random weights. Both are
deterministic: the same text and seed give the same files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SPECIAL = ("<s>", "</s>", "<pad>")
# A plain chat format whose rendering of the first messages is a prefix of the whole: the
# prompt / response split of loramill.text.records relies on that.
CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def build_tokenizer(texts: Sequence[str], vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on ``texts``, with BOS added to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(texts), trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    tokenizer: Any, seed: int = 0, hidden: int = 64, layers: int = 2, init_std: float = 0.25
) -> Any:
    """LlamaForCausalLM sized for tests and the demo, seeded random weights (build_causal_lm)."""
    return build_causal_lm("LlamaConfig", "LlamaForCausalLM", tokenizer, seed, hidden, layers,
                           init_std, num_key_value_heads=4)  # fmt: skip


def build_causal_lm(
    config_class: str, model_class: str, tokenizer: Any, seed: int = 0, hidden: int = 64,
    layers: int = 2, init_std: float = 0.25, **own: Any,
) -> Any:  # fmt: skip
    """A transformers causal LM (``model_class`` of ``config_class``) sized for tests: 4 heads,
    ``own`` the family's own settings over the shared ones, seeded random weights.

    ``init_std`` is wider than transformers' 0.02: behind the final RMSNorm a frozen head that
    small caps every logit near ±1.3, so the model can only predict near-uniform
    distributions and no adapter could teach it anything; a pretrained base has no such cap.
    """
    import torch
    import transformers

    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
        **{"tie_word_embeddings": False, **own},
    )
    torch.manual_seed(seed)
    return getattr(transformers, model_class)(config).eval()
