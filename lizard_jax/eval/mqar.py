"""Multi-query associative recall (MQAR, Zoology arXiv 2312.04927) for a pretrained LM, without training.

A prompt lists N key-value pairs, then asks Q of the keys again in the same format; the model must produce each
queried key's value as its next (greedy) token. In text, with the default template:

    Remember the value of each key in this list. apple: dog, table: river, cat: sun. Now recall the values.
    table: river, apple:

Keys and values are single tokens, by construction: the prompt is built in token space from a fixed pool of
tokenizer tokens (`token_pool`): every token whose text is a lowercase word of 3-10 letters (word-initial ones,
" word", where the tokenizer has them, as byte-level BPE does) and that the tokenizer encodes back to exactly that
one token; tokens of the template itself are left out. As in Zoology the key and value vocabularies are
disjoint: the pool, in token-id order, is split alternately into keys and values. Per prompt the keys are distinct (drawn without replacement), values are drawn
with replacement, and the Q queried keys are distinct and in random order. Template pieces (intro, ":", ",",
bridge) are tokenized once and spliced in.

Scoring: one forward pass per prompt scores all Q queries. The prompt holds the correct values of the earlier
queries (teacher forcing) and the argmax of the logits at the last token of each query's ":" is the prediction.
This is exact for greedy single-token answers: it equals asking each query in its own greedy generation whose
prompt is everything up to that query's ":" (earlier queries answered correctly), since a causal model's logits
at a position depend only on the tokens up to it.

Context length: `pairs` gives prompts of exactly N pairs; `lengths` fills each prompt with as many pairs as fit
in L tokens (queries drawn uniformly from all of them, so recalled pairs lie at every depth). All prompts of one
setting have the same length, so they are batched without padding.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import sys
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lizard_jax.cli import InputError
from lizard_jax.eval.speed import forward_at
from lizard_jax.models import Transformer

WORD = re.compile(r" ?[a-z]{3,10}")


@dataclasses.dataclass(frozen=True)
class Template:
    """Text pieces around the pairs: intro, pairs joined by `delim` with `sep` between key and value, bridge,
    then the queries in the same format."""

    intro: str = "Remember the value of each key in this list."
    sep: str = ":"
    delim: str = ","
    bridge: str = ". Now recall the values."


@dataclasses.dataclass(frozen=True)
class TemplateIds:
    """The template's pieces as token ids (each piece tokenized on its own)."""

    intro: tuple[int, ...]
    sep: tuple[int, ...]
    delim: tuple[int, ...]
    bridge: tuple[int, ...]

    @classmethod
    def encode(cls, tokenizer, template: Template = Template()) -> "TemplateIds":
        enc = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])
        ids = cls(*(enc(getattr(template, f.name)) for f in dataclasses.fields(template)))
        if not ids.sep:
            raise InputError(f"the template's separator {template.sep!r} encodes to no tokens")
        return ids

    def prompt_length(self, num_pairs: int, num_queries: int) -> int:
        s, d = len(self.sep), len(self.delim)
        return (len(self.intro) + num_pairs * (2 + s) + (num_pairs - 1) * d + len(self.bridge)
                + num_queries * (1 + s) + (num_queries - 1) * (1 + d))

    def pairs_for_length(self, length: int, num_queries: int) -> int:
        """The most pairs whose prompt (with `num_queries` queries) fits in `length` tokens."""
        one = self.prompt_length(1, num_queries)
        n = 1 + (length - one) // (2 + len(self.sep) + len(self.delim)) if length >= one else 0
        if n < num_queries:
            raise InputError(f"length {length} fits {n} pairs, fewer than the {num_queries} queries "
                             f"(needs >= {self.prompt_length(num_queries, num_queries)} tokens)")
        return n


def token_pool(tokenizer, pattern: re.Pattern = WORD, exclude: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(key ids, value ids): disjoint pools of single-token words (see the module doc), in token-id order,
    without special tokens and the ids in `exclude` (the template's own, so a key never occurs in the intro)."""
    skip = set(tokenizer.all_special_ids) | set(exclude)
    ids = [i for i in range(len(tokenizer)) if i not in skip]
    texts = tokenizer.batch_decode([[i] for i in ids])
    cand = [(i, s) for i, s in zip(ids, texts) if pattern.fullmatch(s)]
    if any(s.startswith(" ") for _, s in cand):  # word-initial forms exist: drop the bare (suffix) pieces
        cand = [(i, s) for i, s in cand if s.startswith(" ")]
    enc = tokenizer([s for _, s in cand], add_special_tokens=False)["input_ids"] if cand else []
    pool = np.asarray([i for (i, _), e in zip(cand, enc) if list(e) == [i]], np.int32)
    if len(pool) < 4:
        raise InputError(f"the tokenizer has only {len(pool)} single-token words matching {pattern.pattern!r}")
    return pool[0::2], pool[1::2]


def build_prompt(rng: np.random.Generator, ids: TemplateIds, keys: np.ndarray, values: np.ndarray,
                 num_pairs: int, num_queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One prompt -> (tokens [L] int32, at [Q]: index of the last token of each query's separator, where the
    value is predicted, answers [Q])."""
    if num_pairs > len(keys):
        raise InputError(f"{num_pairs} pairs need distinct keys but the key pool has only {len(keys)}")
    if not 1 <= num_queries <= num_pairs:
        raise InputError(f"num_queries must be in [1, num_pairs={num_pairs}], got {num_queries}")
    k = rng.choice(keys, num_pairs, replace=False)
    v = rng.choice(values, num_pairs, replace=True)
    q = rng.choice(num_pairs, num_queries, replace=False)
    out = list(ids.intro)
    for i in range(num_pairs):
        out += ([*ids.delim] if i else []) + [int(k[i]), *ids.sep, int(v[i])]
    out += ids.bridge
    at = []
    for j, i in enumerate(q):
        out += ([int(v[q[j - 1]]), *ids.delim] if j else []) + [int(k[i]), *ids.sep]
        at.append(len(out) - 1)
    return np.asarray(out, np.int32), np.asarray(at, np.int32), v[q].astype(np.int32)


@functools.partial(jax.jit, static_argnames=("model",))
def _greedy_at(model: Transformer, params, tokens, at):
    """Argmax next tokens `[batch, Q]` at indices `at [batch, Q]` of tokens `[batch, L]`."""
    return jnp.argmax(forward_at(model, params, tokens, at=at), axis=-1).astype(jnp.int32)


def model_predictor(model: Transformer, params) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """predict(tokens [B, L], at [B, Q]) -> greedy next tokens [B, Q] at `at`, one batched forward pass."""
    return lambda tokens, at: np.asarray(_greedy_at(model, params, jnp.asarray(tokens), jnp.asarray(at)))


def mqar(model: Transformer | None, params, tokenizer, *, pairs: Sequence[int] = (8, 32, 128),
         lengths: Sequence[int] = (), num_queries: int = 16, trials: int = 10, batch_size: int = 4, seed: int = 0,
         template: Template = Template(), predict: Callable | None = None, progress: bool = True) -> dict:
    """MQAR accuracy over all queries of all settings (see the module doc). One setting per entry of `pairs`
    (exactly N pairs, min(num_queries, N) queries) and of `lengths` (as many pairs as fit in L tokens);
    `trials` prompts each. `predict(tokens, at) -> answers` replaces the model (tests, other scorers)."""
    if not pairs and not lengths:
        raise InputError("give at least one of pairs or lengths")
    for name, v in (("num_queries", num_queries), ("trials", trials), ("batch_size", batch_size)):
        if v < 1:
            raise InputError(f"{name} must be >= 1, got {v}")
    if any(n < 1 for n in pairs) or any(n < 1 for n in lengths):
        raise InputError(f"pairs and lengths must be positive, got {list(pairs)=} {list(lengths)=}")
    predict = predict or model_predictor(model, params)
    ids = TemplateIds.encode(tokenizer, template)
    keys, values = token_pool(tokenizer, exclude=ids.intro + ids.sep + ids.delim + ids.bridge)
    settings = [(n, None) for n in pairs] + [(ids.pairs_for_length(n, num_queries), n) for n in lengths]
    rng = np.random.default_rng(seed)
    # every prompt before the first forward pass: a setting that cannot be built fails before any work
    built = [[build_prompt(rng, ids, keys, values, n, min(num_queries, n)) for _ in range(trials)]
             for n, _ in settings]
    bar = tqdm(total=len(settings) * trials, desc="mqar", file=sys.stderr, disable=not progress)
    results, example = [], None
    for (n, length), prompts in zip(settings, built):
        q = min(num_queries, n)
        example = example or tokenizer.decode(prompts[0][0])
        correct = 0
        for i in range(0, trials, batch_size):
            chunk = prompts[i: i + batch_size]
            chunk += [chunk[0]] * (batch_size - len(chunk))  # full batches: one compiled program per setting
            tokens, at, answers = (np.stack(x) for x in zip(*chunk))
            hit = np.asarray(predict(tokens, at)) == answers
            correct += int(hit[: min(batch_size, trials - i)].sum())
            bar.update(min(batch_size, trials - i))
        results.append({"pairs": n, "length": length, "prompt_tokens": int(len(prompts[0][0])), "queries": q,
                        "correct": correct, "total": q * trials, "accuracy": correct / (q * trials)})
    bar.close()
    acc = lambda rs: sum(r["correct"] for r in rs) / sum(r["total"] for r in rs)
    return {
        "task": "mqar",
        "accuracy": acc(results),
        "by_pairs": {str(r["pairs"]): r["accuracy"] for r in results if r["length"] is None},
        "by_length": {str(r["length"]): r["accuracy"] for r in results if r["length"] is not None},
        "settings": results, "num_queries": num_queries, "trials": trials, "seed": seed,
        "pool": {"keys": int(len(keys)), "values": int(len(values))},
        "chance": 1 / len(values),
        "scoring": "one forward pass per prompt, earlier queries' values teacher-forced, argmax at each query's "
                   "separator: exact for greedy single-token answers",
        "example": example[:400] + ("..." if len(example) > 400 else ""),
    }
