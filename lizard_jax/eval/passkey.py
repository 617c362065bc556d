"""Passkey retrieval: a random 5-digit number hidden at several depths in real text.

Each prompt is built in token space so its length is exact: an instruction, filler tokens from a real text
file (a contiguous slice, different per trial), the key sentence inserted at `depth` (0 = start, 1 = end), then
the question. The model continues greedily; a trial is correct if the first 5-digit number in its answer is the
key. Generation options (context parallelism, pruned prefill, ...) pass through to `lizard_jax.generate`.
`query="question"` (the default) hands the question to `generate` as the query (`generate(..., query=)`): with
context parallelism it is Star's phase-2 query, as in the paper; other paths read the same tokens either way.
`query="last"` leaves the split to `generate` (the last `query_size` prompt tokens).
"""

from __future__ import annotations

import re
import sys
from typing import Sequence

import numpy as np
from tqdm import tqdm

from lizard_jax.cli import InputError

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.\n\n")
KEY = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


QUERIES = ("question", "last")


def build_prompt(tokenizer, filler_ids: Sequence[int], length: int, depth: float, key: int) -> list[int]:
    """Token ids of one prompt of exactly `length` tokens (filler trimmed to fit)."""
    context, question = build_parts(tokenizer, filler_ids, length, depth, key)
    return context + question


def build_parts(tokenizer, filler_ids: Sequence[int], length: int, depth: float,
                key: int) -> tuple[list[int], list[int]]:
    """`build_prompt`'s ids as (context: instruction, filler and key sentence; question)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    intro, needle, question = enc(INTRO), enc(KEY.format(key=key)), enc(QUESTION)
    n_fill = length - len(intro) - len(needle) - len(question)
    if n_fill < 0:
        raise InputError(f"length {length} is too short for the passkey prompt: its instruction, key sentence "
                         f"and question alone take {length - n_fill} tokens")
    if len(filler_ids) < n_fill:
        raise InputError(f"filler text has {len(filler_ids)} tokens; length {length} needs {n_fill}: give a "
                         "longer text or a shorter length")
    fill = list(filler_ids[:n_fill])
    at = int(round(depth * n_fill))
    return intro + fill[:at] + needle + fill[at:], question


def passkey(model, params, tokenizer, filler_text: str, *, lengths: Sequence[int] = (8192,),
            depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 1, seed: int = 0,
            max_new_tokens: int = 8, progress: bool = True, query: str = "question", **generate_kwargs) -> dict:
    import lizard_jax

    if query not in QUERIES:
        raise InputError(f"query must be one of {QUERIES}, got {query!r}")
    if not all(0 <= d <= 1 for d in depths):
        raise InputError(f"depths must be in [0, 1], got {list(depths)}")
    rng = np.random.default_rng(seed)
    filler = tokenizer(filler_text, add_special_tokens=False)["input_ids"]
    for length in lengths:  # every length fits the text: fail before the first generation, not after
        build_prompt(tokenizer, filler, length, 0.0, 99999)
    results = []
    total = len(lengths) * len(depths) * trials
    bar = tqdm(total=total, desc="passkey", file=sys.stderr, disable=not progress)
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = int(rng.integers(10000, 100000))
                start = int(rng.integers(0, max(1, len(filler) - length)))
                ctx, question = build_parts(tokenizer, filler[start:], length, depth, key)
                split = dict(query=[question]) if query == "question" else {}
                out = lizard_jax.generate(model, params, [ctx] if split else [ctx + question], tokenizer=tokenizer,
                                          max_new_tokens=max_new_tokens, **generate_kwargs, **split)
                answer = out.texts[0]
                found = re.search(r"\d{5}", answer)
                ok = bool(found and int(found.group()) == key)
                results.append({"length": length, "depth": depth, "key": key, "answer": answer, "correct": ok})
                bar.update(1)
    bar.close()
    by_length = {
        str(n): float(np.mean([r["correct"] for r in results if r["length"] == n])) for n in lengths
    }
    return {"task": "passkey", "accuracy": float(np.mean([r["correct"] for r in results])),
            "by_length": by_length, "trials": results}
