"""A short end-to-end check on the GPU before long runs: a tiny random teacher, both training stages with the
default kernels (impl="auto" -> Pallas), export, perplexity, generation. Prints OK or raises.

    python -m benchmarks.gpu_smoke [TEXT]     # from the repository root (as a module: lizard_jax is importable)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax

import lizard_jax
from lizard_jax.eval.perplexity import perplexity
from lizard_jax.testing import save_tiny_teacher
from lizard_jax.textio import read_text
from lizard_jax.train import TrainConfig, Trainer

# the shipped training text (data/README.md); any plain or compressed text file can be passed instead
TEXT = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare" / "input.txt.xz"


def main(text: str) -> None:
    d = Path(tempfile.mkdtemp())
    save_tiny_teacher(d / "teacher", num_layers=2, head_dim=64, num_heads=4, num_kv_heads=2, d_model=128)
    cfg = {
        "teacher": str(d / "teacher"), "run_dir": str(d / "run"), "dtype": "bfloat16",
        "student": {"attention": {"default": {"kind": "lizard", "window": 16, "gate_scale_init": 0.5}}},
        "data": {"source": "text", "paths": [text], "seq_len": 256, "batch_size": 4, "max_tokens": 100000},
        "stage1": {"steps": 5}, "stage2": {"steps": 5, "lora": {"rank": 4}}, "log_every": 1,
        "checkpoint": {"every": 5},
    }
    out = Trainer(TrainConfig.from_dict(cfg)).run()
    model, params, tok = lizard_jax.load(out)
    ids = tok(read_text(text)[:5000])["input_ids"]
    print(json.dumps(perplexity(model, params, ids, seq_len=256, progress=False)))
    print(lizard_jax.generate(model, params, ["Hello"], tokenizer=tok, max_new_tokens=8).tokens)
    print("OK", jax.devices())


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(TEXT))
