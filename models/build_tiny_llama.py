"""Build the embedded tiny LLaMA-architecture model (models/tiny-llama), offline, in seconds.

    python models/build_tiny_llama.py [OUT_DIR]

A byte-level BPE tokenizer trained with the ``tokenizers`` library on the demo text world's
full set of procedures (loramill.demo.text: every task × unit, so any demo record tokenizes
into the same pieces) and transformers' LlamaForCausalLM with seeded random weights
(loramill.demo.tiny_llama: a small LlamaConfig, 4 heads, 2 layers). It knows nothing: what a text
adapter teaches it shows plainly in the evaluation. Deterministic: the same package versions
write byte-identical files.
"""

from __future__ import annotations

import sys
from pathlib import Path

from loramill.demo.text import TASKS, UNITS, procedure_records
from loramill.demo.tiny_llama import build_model, build_tokenizer

OUT = Path(__file__).resolve().parent / "tiny-llama"


def build(out: Path = OUT) -> Path:
    records = procedure_records(len(TASKS) * len(UNITS), seed=0)
    tokenizer = build_tokenizer([r["prompt"] + r["response"] for r in records])
    model = build_model(tokenizer, seed=0, hidden=64, layers=2)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT))
