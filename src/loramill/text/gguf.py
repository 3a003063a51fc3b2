"""GGUF files for llama.cpp: a text adapter as a GGUF LoRA, and the embedded base.

llama.cpp loads a LoRA from its own GGUF layout (``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``; per target weight ``<name>.lora_a`` of
torch shape (rank, in) and ``<name>.lora_b`` of (out, rank), the scale alpha / rank as in
peft). Weight names follow llama.cpp's (``blk.0.attn_q.weight``), looked up with the gguf
package's name map. For the LLaMA architecture llama.cpp stores the query and key
projections with their rotary halves interleaved (Mistral too, which llama.cpp reads as
LLaMA), so those LoRAs' B rows are permuted the same way; Qwen2 and Qwen3 keep the Hugging Face
order. Llama 3.x's rope scaling goes in as llama.cpp's ``rope_freqs`` tensor.

``write_base_gguf`` converts a small model of those families with a byte-level BPE tokenizer
(the embedded tiny model, loramill.demo.tiny_families') so an adapter can be checked in
llama.cpp offline, following the rules of llama.cpp's own ``convert_hf_to_gguf.py`` (use that
for hub models): Gemma's norm weights shifted by one, its soft-capping and sliding window as
keys, its output head left to the tied embeddings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.files import atomic_path
from loramill.models.checkpoint import PROVENANCE_KEY

# transformers architecture → (llama.cpp architecture, whether q/k rows are interleaved)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),  # its q/k norms are tensors of their own
    "Gemma2ForCausalLM": ("gemma2", False),
    "Gemma3ForCausalLM": ("gemma3", False),
}
# Gemma's RMSNorm scales by 1 + weight, llama.cpp's by the weight: its converter adds 1
NORM_SHIFTED = ("gemma2", "gemma3")
PEFT_PREFIX = "base_model.model."


def architecture(config: dict[str, Any]) -> tuple[str, bool]:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise LoramillError(
        f"text.export.gguf: no GGUF LoRA for {', '.join(names) or 'this model'} "
        f"(supported: {', '.join(ARCHITECTURES)}); set gguf: false"
    )


def interleave_rope(weight: Any, heads: int) -> Any:
    """Rows of a q/k projection (or its LoRA B) in llama.cpp's rotary order: per head, the
    Hugging Face halves [x0..x(d/2-1), y0..] become pairs [x0, y0, x1, y1, ...]."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _name_map(arch: str, blocks: int) -> Any:
    import gguf

    kind = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(kind, blocks)


def _gguf_name(names: Any, hf_name: str) -> str:
    found = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise LoramillError(f"GGUF: no llama.cpp name for '{hf_name}'")
    return found


def _permuted(hf_name: str, weight: Any, config: dict[str, Any]) -> Any:
    """``weight`` (rows = outputs) in llama.cpp's order for a LLaMA q/k projection."""
    heads = config["num_attention_heads"]
    if ".q_proj." in hf_name:
        return interleave_rope(weight, heads)
    if ".k_proj." in hf_name:
        return interleave_rope(weight, config.get("num_key_value_heads") or heads)
    return weight


def export_gguf_lora(
    adapter_dir: str | os.PathLike, base_config: dict[str, Any], out: str | os.PathLike,
    name: str, provenance: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """``adapter_dir`` (a peft LoRA folder) as a llama.cpp GGUF LoRA adapter; ``provenance``
    goes in as the JSON string ``loramill.provenance`` (llama.cpp ignores keys it does not
    know; ``gguf-dump`` shows it)."""
    import gguf
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if settings.get("use_rslora") or settings.get("use_dora"):
        raise LoramillError("text.export.gguf: rsLoRA and DoRA adapters have no GGUF form")
    arch, interleaved = architecture(base_config)
    names = _name_map(arch, base_config["num_hidden_layers"])
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(settings["lora_alpha"]))
        writer.add_name(name)
        if provenance is not None:
            writer.add_string(PROVENANCE_KEY, json.dumps(provenance, sort_keys=True))
        for key in sorted(k for k in tensors if ".lora_A." in k):
            module = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
            a, b = tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")]
            target = _gguf_name(names, f"{module}.weight")
            if interleaved:
                b = _permuted(f"{module}.", b, base_config)
            writer.add_tensor(f"{target}.lora_a", a.float().contiguous().numpy())
            writer.add_tensor(f"{target}.lora_b", b.float().contiguous().numpy())
        _write(writer)
    return Path(out)


def _write(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_bpe_tokenizer(writer: Any, folder: Path, config: dict[str, Any]) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's "gpt2" model."""
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE":
        raise LoramillError(f"{folder}: not a BPE tokenizer; use llama.cpp's convert_hf_to_gguf")
    vocab = {**model["vocab"], **{t["content"]: t["id"] for t in spec.get("added_tokens", [])}}
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split ByteLevel(use_regex) applies
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if config.get(key) is not None:
            add(config[key])
    writer.add_add_bos_token(True)


def llama3_rope_factors(config: dict[str, Any]) -> Any:
    """Llama 3.x's rope scaling as llama.cpp reads it, a divisor of each rotary frequency
    (its ``rope_freqs`` tensor), or None without that scaling. Transformers divides the
    frequencies of wavelengths past ``original / low_freq_factor`` by ``factor``, keeps those
    below ``original / high_freq_factor``, and blends between them."""
    import numpy as np

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type") != "llama3":
        return None
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    theta = float(rope.get("rope_theta", config.get("rope_theta", 1e4)))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    frequencies = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelengths = 2 * np.pi / frequencies
    smooth = (original / wavelengths - low) / (high - low)
    divisors = 1 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelengths < original / high, 1.0, divisors)
    return np.where(wavelengths > original / low, factor, divisors).astype(np.float32)


def _add_gemma_keys(writer: Any, arch: str, config: dict[str, Any]) -> None:
    """What llama.cpp's Gemma reads beyond LLaMA's: the head size, the soft-capping of the
    attention scores (Gemma 2) and of the logits, and the sliding window."""
    if arch not in NORM_SHIFTED:
        return
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    if config.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])


def write_base_gguf(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A small model folder of a family in ARCHITECTURES (float32, byte-level BPE) as a
    llama.cpp GGUF model."""
    import gguf
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch, interleaved = architecture(config)
    names = _name_map(arch, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(folder.name)
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
        writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
        rope = config.get("rope_parameters") or {}
        writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 1e4))))
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        _add_gemma_keys(writer, arch, config)
        _add_bpe_tokenizer(writer, folder, config)
        if (factors := llama3_rope_factors(config)) is not None:
            writer.add_tensor("rope_freqs.weight", factors)
        for hf_name, weight in sorted(load_file(folder / "model.safetensors").items()):
            if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                continue  # llama.cpp reads the output head from the embeddings
            if interleaved:
                weight = _permuted(hf_name, weight, config)
            if arch in NORM_SHIFTED and hf_name.endswith("norm.weight"):
                weight = weight + 1
            writer.add_tensor(_gguf_name(names, hf_name), weight.float().contiguous().numpy())
        _write(writer)
    return Path(out)
