"""LazyLLM (`lizard_jax.lazy`) vs full prefill on one GPU: time to first token, and accuracy on SmolLM2.

    python benchmarks/bench_lazyllm.py --checkpoint CKPT [--text data/wikitext-2/valid.txt.xz]
    python benchmarks/bench_lazyllm.py ... --parts ttft         # one part per call: ttft, accuracy, curve, ranks
    python benchmarks/bench_lazyllm.py ... --quick              # fewer lengths, windows, reps and scales
    python benchmarks/bench_lazyllm.py ... --parts accuracy --decode paper \
        --schedules "gentle=15,22:0.8,0.6;default;aggressive=2,8,15:0.4,0.2,0.1"
    python benchmarks/bench_lazyllm.py ... --parts ttft --models smollm2 --ttft-dtype float32 --lengths 4096  # CPU
    ... --no-report                                               # tables on stdout only, RESULTS.md untouched

Schedule: `LazyConfig.default(num_layers)` (SmolLM2, 30 layers: prune after layer 20 keeping 10% of the
prompt), or --layers/--keep, or several named ones in one run with --schedules ("name=layers:keep"
entries separated by ";", a bare "default" is `LazyConfig.default`): the full-model baseline is computed once
and each schedule adds rows. --decode picks `LazyConfig.decode` ("attend_all" or "paper") for the decoding in
the accuracy part and the curve. The curve scales the keep fractions of the first schedule.

1. ttft: SmolLM2-135M (CKPT) and a random Llama-3.2-1B-shaped model (--models), --ttft-dtype (bf16 by default),
   batch 1, random prompts of 4K..32K tokens. full = the model's own layers on every prompt token through plain
   KV caches, logits of the last token only; lazy = `lazy_prefill`. Both use the XLA attention path (explicit
   positions), caches of P + 128 slots, and return their caches; median of --reps after a compile run, in the
   same process, full once per prompt length. "computed" = fraction of prompt-token x layers the lazy prefill
   computed (its counter; the schedule's own number beside it), "per layer" = each layer's fraction of the
   prompt, as runs `fraction x layers`. A config that fails (e.g. out of memory) shows the error.
2. accuracy (SmolLM2, --acc-dtype, default float32), full vs each lazy schedule:
   passkey: `lizard_jax.eval.passkey.build_prompt` prompts of exactly 4K / 8K tokens, key at 5 depths x --trials,
   filler from --text, greedy 8 tokens, correct if the first 5-digit number is the key; full = the plain
   `generate._generate`, lazy = `generate_lazy`.
   perplexity of the 128 tokens that follow 2K / 4K / 8K tokens of --text, at --windows evenly spaced offsets:
   full = one forward pass over context + 128; lazy = `lazy_logprobs` (the 128 tokens fed as decode steps,
   each step selecting and reviving tokens like generation does, in --decode's mode).
   A second table: the fraction of prompt tokens computed at each layer, by the prefill (the schedule) and after
   the 128 teacher-forced decode steps (the counter: revived tokens added).
3. ranks: where the model reads the key, for choosing the pruning layers: for the accuracy part's passkey
   prompts (--passkey-lengths, --trials), per layer, the fraction of the prompt that LazyLLM's score (the last
   token's attention, full prefill) ranks above the key; a pruning after a layer keeps the key only if it keeps
   more than that.
4. curve: keep fractions scaled by --scales: TTFT speedup at 8K vs passkey accuracy at 8K and perplexity ratio at
   4K, as a table and a PNG (--png).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import os
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lizard_jax  # noqa: E402
from benchmarks.common import WIKITEXT, device_name, report, time_jax  # noqa: E402
from lizard_jax.config import ConfigError, ModelConfig, RopeConfig  # noqa: E402
from lizard_jax.eval.passkey import KEY, build_parts  # noqa: E402
from lizard_jax.generate import SamplingConfig, _generate, left_pad  # noqa: E402
from lizard_jax.layers.common import KVCache  # noqa: E402
from lizard_jax.lazy import LazyConfig, generate_lazy, lazy_logprobs, lazy_prefill  # noqa: E402
from lizard_jax.lazy.reference import last_token_scores  # noqa: E402
from lizard_jax.models import Transformer, init_caches, init_params  # noqa: E402
from lizard_jax.textio import read_text  # noqa: E402

LLAMA_1B = dict(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                ffn_dim=8192, tie_embeddings=True, max_seq_len=131072,
                rope=RopeConfig(theta=500000.0, scaling="llama3", factor=32.0, original_max_position=8192))
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
CONTINUATION = 128
GREEDY = SamplingConfig()


# ----------------------------------------------------------------------------------------------------------
# the two prefills and the two evaluations


@functools.partial(jax.jit, static_argnames=("model", "cache_len"))
def full_prefill(model: Transformer, params, tokens, positions, *, cache_len: int):
    """Every layer on every prompt token through plain KV caches -> (last-token logits [B, V], caches)."""

    def run(m, tokens, positions, caches):
        x = m.embed(tokens)
        out = []
        for layer, cache in zip(m.layers, caches):
            x, cache = layer(x, positions, cache)
            out.append(cache)
        return m.head(x[:, -1]), tuple(out)

    caches = init_caches(model.cfg, tokens.shape[0], cache_len)
    return model.apply({"params": params}, tokens, positions, caches, method=run)


@functools.partial(jax.jit, static_argnames=("model", "n"))
def full_logprobs(model: Transformer, params, tokens, *, n: int):
    """Log-probs [B, n] of the last n tokens of `tokens` [B, T] under one plain forward pass."""

    def run(m, tokens):
        x = m.embed(tokens)
        for layer in m.layers:
            x, _ = layer(x, None, None)
        return m.head(x[:, -n - 1:-1])

    logits = model.apply({"params": params}, tokens, method=run)
    return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, -n:, None], axis=-1)[..., 0]


def passkey_cases(tok, filler, length: int, *, trials: int, seed: int = 0) -> list[tuple[list[int], int, list]]:
    """[(prompt ids of exactly `length` tokens, key, [(start, end) of each copy of the key's digit tokens])] for
    5 depths x trials; the same keys and filler slices for every schedule (seeded by length)."""
    rng = np.random.default_rng(seed + length)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    cases = []
    for depth in DEPTHS:
        for _ in range(trials):
            key = int(rng.integers(10000, 100000))
            start = int(rng.integers(0, max(1, len(filler) - length)))
            context, question = build_parts(tok, filler[start:], length, depth, key)
            needle = enc(KEY.format(key=key))
            at = next(i for i in range(len(context) - len(needle), -1, -1) if context[i:i + len(needle)] == needle)
            digit = [any(c.isdigit() for c in tok.decode([t])) for t in needle]
            runs = [(at + i, at + j) for i, j in _runs(digit)]
            cases.append((context + question, key, runs))
    return cases


def _runs(flags) -> list[tuple[int, int]]:
    """[(start, end)] of the runs of True in `flags`."""
    out, start = [], None
    for i, f in enumerate([*flags, False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def passkey_accuracy(model, params, tok, filler, length: int, lazy: LazyConfig | None, *, trials: int,
                     batch: int, seed: int = 0) -> float:
    """Fraction of `passkey_cases` prompts answered right; lazy=None runs the plain generation."""
    cases = [(p, key) for p, key, _ in passkey_cases(tok, filler, length, trials=trials, seed=seed)]
    eos = tuple(model.cfg.eos_token_ids)
    right = 0
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        toks, pos = left_pad([c[0] for c in chunk], model.cfg.pad_token_id)
        kw = dict(max_new_tokens=8, sampling=GREEDY, eos_ids=eos)
        if lazy is None:
            out = _generate(model, params, toks, pos, jax.random.key(0), cache_len=toks.shape[1] + 8, **kw)
        else:
            out = generate_lazy(model, params, toks, pos, jax.random.key(0), lazy=lazy, **kw)
        for row, (_, key) in zip(np.asarray(out), chunk):
            text = tok.decode([int(t) for t in row if t >= 0 and t not in eos], skip_special_tokens=True)
            found = re.search(r"\d{5}", text)
            right += bool(found and int(found.group()) == key)
    return right / len(cases)


def needle_ranks(model: Transformer, params, cases, *, batch: int) -> np.ndarray:
    """`[L, N]`: for each layer and `passkey_cases` prompt (all the same length), the fraction of prompt tokens
    that LazyLLM's score at that layer (the last token's attention, mean over heads; full prefill) ranks above
    the key: above the weakest digit token of its best-placed copy. A pruning after that layer keeps a whole
    copy of the key only if it keeps more than this fraction (pool 1, no sink or recent tokens)."""
    cfg = model.cfg
    out = []
    for b0 in range(0, len(cases), batch):
        chunk = cases[b0:b0 + batch]
        toks = jnp.asarray(np.array([c[0] for c in chunk], np.int32))
        pos = jnp.broadcast_to(jnp.arange(toks.shape[1], dtype=jnp.int32), toks.shape)
        x = model.apply({"params": params}, toks, method=lambda m, t: m.embed(t))
        ranks = np.zeros((cfg.num_layers, len(chunk)))
        for i in range(cfg.num_layers):
            cache = KVCache.create(len(chunk), toks.shape[1], cfg.num_kv_heads, cfg.head_dim, x.dtype)
            (x, cache), inter = model.apply({"params": params}, x, pos, cache, mutable=["intermediates"],
                                            method=lambda m, *a, i=i: m.layers[i](*a))
            h = inter["intermediates"][f"layers_{i}"]["attn_in"][0]
            score = np.asarray(last_token_scores(model, params, i, h, pos, cache.k, cache.pos))
            for r, (_, _, copies) in enumerate(chunk):
                weakest = max(score[r, s:e].min() for s, e in copies)
                ranks[i, r] = np.mean(score[r, :-1] > weakest)
        out.append(ranks)
    return np.concatenate(out, axis=1)


def continuation_ppl(model, params, ids, context: int, lazy: LazyConfig | None, *,
                     windows: int) -> tuple[float, np.ndarray | None]:
    """(perplexity of the CONTINUATION tokens after `context` tokens over `windows` evenly spaced windows (one
    batch), lazy: each layer's fraction of the prompt computed by the end of the decode steps `[L]`, else None)."""
    starts = np.linspace(0, len(ids) - context - CONTINUATION - 1, windows).astype(int)
    rows = jnp.asarray(np.stack([ids[s:s + context + CONTINUATION] for s in starts]).astype(np.int32))
    if lazy is None:
        lp, fractions = full_logprobs(model, params, rows, n=CONTINUATION), None
    else:
        pos = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (windows, context))
        lp, state = lazy_logprobs(model, params, rows[:, :context], pos, rows[:, context:], lazy=lazy)
        fractions = np.asarray(state.layer_fractions())
    return math.exp(-np.asarray(lp, np.float64).mean()), fractions


# ----------------------------------------------------------------------------------------------------------


def cached(memo: dict, key, fn):
    """memo[key], computed by fn() once (full-model numbers are shared by the accuracy table and the curve)."""
    if key not in memo:
        memo[key] = fn()
    return memo[key]


def is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def short_error(e: Exception) -> str:
    return "OOM" if is_oom(e) else f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def parse_schedules(text: str) -> list[tuple[str, tuple[int, ...] | None, tuple[float, ...] | None]]:
    """--schedules: "gentle=15,22:0.8,0.6;default;aggressive=2,8,15:0.4,0.2,0.1" -> [(name, layers, keep)];
    layers None (a bare "default", or "name=default"): `LazyConfig.default(num_layers)`."""
    out = []
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        name, _, body = entry.partition("=")
        name, body = name.strip(), body.strip() or name.strip()
        if body == "default":
            out.append((name, None, None))
            continue
        layers, colon, keep = body.partition(":")
        try:
            if not colon:
                raise ValueError("expected name=layers:keep")
            sched = (name, tuple(int(x) for x in layers.split(",")), tuple(float(x) for x in keep.split(",")))
            LazyConfig(layers=sched[1], keep=sched[2])
        except (ValueError, ConfigError) as e:
            raise argparse.ArgumentTypeError(f"schedule {entry!r}: {e}") from None
        out.append(sched)
    names = [n for n, _, _ in out]
    if not out or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--schedules needs at least one schedule and distinct names, got {names}")
    return out


def schedules(a, num_layers: int, scale: float = 1.0) -> list[tuple[str, LazyConfig]]:
    """[(name, LazyConfig)] of --schedules, else the one of --layers/--keep or the default; keep fractions scaled,
    decoding in --decode's mode."""
    named = a.schedules or [("custom" if a.layers else "default", tuple(a.layers) or None, tuple(a.keep) or None)]
    out = []
    for name, layers, keep in named:
        base = LazyConfig(layers=layers, keep=keep) if layers else LazyConfig.default(num_layers)
        out.append((name, dataclasses.replace(base, keep=tuple(min(1.0, f * scale) for f in base.keep),
                                              decode=a.decode)))
    return out


def schedule(a, num_layers: int, scale: float = 1.0) -> LazyConfig:
    """The first schedule (the one the curve scales)."""
    return schedules(a, num_layers, scale)[0][1]


def schedule_fractions(lazy: LazyConfig, prompt_len: int, num_layers: int) -> np.ndarray:
    """`[L]`: each layer's fraction of the prompt that the pruned prefill computes, by the schedule."""
    kept = (prompt_len, *lazy.budgets(prompt_len))
    return np.concatenate([np.full(e - s + 1, n / prompt_len) for n, (s, e) in zip(kept, lazy.stages(num_layers))])


def per_layer(fractions) -> str:
    """Per-layer fractions as runs, layer 0 first: "1.00x5 0.50x8 0.25x9 0.15x8"."""
    runs: list[list] = []
    for f in (f"{float(x):.2f}" for x in fractions):
        if runs and runs[-1][0] == f:
            runs[-1][1] += 1
        else:
            runs.append([f, 1])
    return " ".join(f"{f}x{n}" for f, n in runs)


def describe(scheds) -> str:
    return "; ".join(f"{name} = layers {lazy.layers} keep {lazy.keep}" for name, lazy in scheds)


def emit(a, *args, **kw):
    """`report` (stdout, and RESULTS.md unless --no-report)."""
    return report(*args, path=os.devnull if a.no_report else None, **kw)


def ttft(model, params, length: int, lazy: LazyConfig | None, reps: int) -> tuple[float, float]:
    """(median ms, computed fraction) of the prefill of a random prompt of `length` tokens."""
    tokens = jax.random.randint(jax.random.key(length), (1, length), 3, model.cfg.vocab_size, jnp.int32)
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    cache_len = length + CONTINUATION
    if lazy is None:
        return time_jax(lambda: full_prefill(model, params, tokens, positions, cache_len=cache_len), warmup=1,
                        reps=reps), 1.0
    fn = lambda: lazy_prefill(model, params, tokens, positions, lazy=lazy, cache_len=cache_len)
    ms = time_jax(fn, warmup=1, reps=reps)
    return ms, float(fn()[1].computed_fraction())


def part_ttft(a):
    rows, described = [], []
    dtype = a.ttft_dtype
    for name in a.models.split(","):
        try:
            if name == "smollm2":
                model, params, _ = lizard_jax.load(a.checkpoint, dtype=dtype)
            elif name == "llama1b":
                cfg = ModelConfig(**LLAMA_1B, dtype=dtype, param_dtype=dtype)
                model = Transformer(cfg)
                params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
            else:
                raise ValueError(f"unknown model {name!r} (smollm2, llama1b)")
        except Exception as e:  # noqa: BLE001 - a table even if a model does not load
            rows.append([name, "-", "-", short_error(e), "", "", "", "", "", ""])
            continue
        n = model.cfg.num_layers
        scheds = schedules(a, n)
        described.append(f"{name}: {describe(scheds)}")
        for length in a.lengths:
            try:  # once per length: every schedule is timed against the same full prefill
                full_ms = full_cell = ttft(model, params, length, None, a.reps)[0]
            except Exception as e:  # noqa: BLE001
                full_ms, full_cell = None, short_error(e)
            for sname, lazy in scheds:
                row = [name, length, sname, full_cell]
                try:
                    lazy_ms, frac = ttft(model, params, length, lazy, a.reps)
                    row += [lazy_ms, lazy_ms / full_ms if full_ms else "-", full_ms / lazy_ms if full_ms else "-",
                            frac, lazy.computed_fraction(length, n)]
                except Exception as e:  # noqa: BLE001
                    row += [short_error(e), "-", "-", "-", "-"]
                row.append(per_layer(schedule_fractions(lazy, length, n)))
                rows.append(row)
                print(row, flush=True)
        del params
        gc.collect()
    headers = ["model", "prompt", "schedule", "full ms", "lazy ms", "lazy / full", "speedup", "computed (counter)",
               "computed (schedule)", "per layer (fraction x layers)"]
    emit(a, f"LazyLLM: time to first token, full vs lazy prefill (batch 1, {dtype})", headers, rows,
         "prefill + last-token logits, caches kept; XLA attention in both; same process, median of "
         f"{a.reps} after a compile run; schedules: {' | '.join(described)}; target >= 2x at 8K and beyond")


def part_accuracy(a, memo: dict):
    model, params, tok = lizard_jax.load(a.checkpoint, dtype=a.acc_dtype)
    n = model.cfg.num_layers
    scheds = schedules(a, n)
    text = read_text(a.text)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int32)

    def passkey(length, lazy):
        return cached(memo, ("passkey", length, lazy), lambda: passkey_accuracy(
            model, params, tok, ids, length, lazy, trials=a.trials, batch=a.batch))

    def ppl(context, lazy):
        return cached(memo, ("ppl", context, lazy), lambda: continuation_ppl(
            model, params, ids, context, lazy, windows=a.windows))

    def attempt(fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a cell, not the table
            return short_error(e)

    full_ppl = {}
    rows = [["full", "-"]]
    for length in a.passkey_lengths:  # the baseline once per run
        rows[0].append(attempt(lambda: passkey(length, None) * 100))
    for context in a.ppl_contexts:
        full_ppl[context] = attempt(lambda: ppl(context, None)[0])
        rows[0] += [full_ppl[context], 1.0 if isinstance(full_ppl[context], float) else "-"]
    print(rows[0], flush=True)
    fractions = []
    for name, lazy in scheds:
        row = [name, lazy.decode]
        for length in a.passkey_lengths:
            row.append(attempt(lambda: passkey(length, lazy) * 100))
        decoded = {}
        for context in a.ppl_contexts:
            got = attempt(lambda: ppl(context, lazy))
            if isinstance(got, str):
                row += [got, "-"]
                continue
            decoded[context] = got[1]
            full = full_ppl[context]
            row += [got[0], got[0] / full if isinstance(full, float) else "-"]
        rows.append(row)
        print(row, flush=True)
        for length in sorted({*a.passkey_lengths, *a.ppl_contexts}):
            after = decoded.get(length)
            fractions.append([name, length, lazy.computed_fraction(length, n),
                              per_layer(schedule_fractions(lazy, length, n)),
                              "-" if after is None else float(after.mean()),
                              "-" if after is None else per_layer(after)])
    headers = ["schedule", "decode", *(f"passkey % @{n}" for n in a.passkey_lengths),
               *(h for c in a.ppl_contexts for h in (f"ppl @{c}", f"ppl / full @{c}"))]
    emit(a, "LazyLLM: accuracy on SmolLM2-135M, full vs lazy schedules", headers, rows,
         f"{describe(scheds)}; decode {a.decode}; {a.acc_dtype}; passkey: 5 depths x {a.trials} trials (accuracy "
         f"%); ppl: {CONTINUATION} tokens after the context, {a.windows} windows of --text; targets: passkey within 1 "
         "point, ppl within 2%")
    emit(a, "LazyLLM: fraction of prompt tokens computed per layer (SmolLM2-135M)",
         ["schedule", "prompt", "prefill", "prefill per layer (fraction x layers)",
          f"after {CONTINUATION} decode steps", "after decoding per layer"], fractions,
         f"prefill: by the schedule (budgets rounded up to {scheds[0][1].bucket} tokens); after decoding: the counter "
         f"of `lazy_logprobs` over the perplexity windows (revived tokens added; decode {a.decode})")


def part_ranks(a):
    """Where the model looks at the key: per layer, how much of the prompt a pruning there must keep to keep it."""
    model, params, tok = lizard_jax.load(a.checkpoint, dtype=a.acc_dtype)
    ids = np.asarray(tok(read_text(a.text), add_special_tokens=False)["input_ids"], np.int32)
    keeps = (0.5, 0.25, 0.1)
    for length in a.passkey_lengths:
        cases = passkey_cases(tok, ids, length, trials=a.trials)
        ranks = needle_ranks(model, params, cases, batch=a.batch)
        rows = [[i, float(np.median(r)), float(r.max()), *(f"{int(np.sum(r < f))}/{len(r)}" for f in keeps)]
                for i, r in enumerate(ranks)]
        emit(a, f"LazyLLM: rank of the passkey in the pruning score per layer ({Path(a.checkpoint).name}, "
                f"{length} tokens)",
             ["layer", "rank median", "rank max", *(f"key kept @keep {f}" for f in keeps)], rows,
             f"rank = fraction of the prompt that the last token's attention (mean over heads, full prefill, "
             f"{a.acc_dtype}) scores above the key (the weakest digit of its better copy); a pruning after the "
             f"layer keeping a fraction f keeps the key iff rank < f; {len(cases)} prompts: 5 depths x {a.trials}, "
             "the accuracy part's prompts")


def part_curve(a, memo: dict):
    """Rows accumulate in a JSON file beside the PNG (same length, context and layers), so the scales can be split
    over several calls and the PNG shows them all."""
    model, params, tok = lizard_jax.load(a.checkpoint, dtype=a.acc_dtype)
    fast = lizard_jax.load(a.checkpoint, dtype=a.ttft_dtype)[:2]
    text = read_text(a.text)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int32)
    n = model.cfg.num_layers
    length, context = a.curve_length, a.curve_context
    store = Path(a.png).with_suffix(".json")
    setup = {"length": length, "context": context, "layers": list(schedule(a, n).layers), "device": device_name(),
             "decode": a.decode, "ttft_dtype": a.ttft_dtype}
    saved = json.loads(store.read_text()) if store.exists() else {}
    rows = saved.get("rows", {}) if saved.get("setup") == setup else {}
    if "full" not in rows:
        full_pk = cached(memo, ("passkey", length, None), lambda: passkey_accuracy(
            model, params, tok, ids, length, None, trials=a.trials, batch=a.batch))
        full_ppl = cached(memo, ("ppl", context, None), lambda: continuation_ppl(
            model, params, ids, context, None, windows=a.windows))[0]
        rows["full"] = ["full", "-", 1.0, ttft(*fast, length, None, a.reps)[0], 1.0, full_pk * 100, full_ppl, 1.0]
    full_ms, full_ppl = rows["full"][3], rows["full"][6]
    for scale in a.scales:
        lazy = schedule(a, n, scale)
        try:
            ms, frac = ttft(*fast, length, lazy, a.reps)
            pk = cached(memo, ("passkey", length, lazy), lambda: passkey_accuracy(
                model, params, tok, ids, length, lazy, trials=a.trials, batch=a.batch))
            ppl = cached(memo, ("ppl", context, lazy), lambda: continuation_ppl(
                model, params, ids, context, lazy, windows=a.windows))[0]
            rows[str(scale)] = [scale, str(lazy.keep), frac, ms, full_ms / ms, pk * 100, ppl, ppl / full_ppl]
        except Exception as e:  # noqa: BLE001
            rows[str(scale)] = [scale, str(lazy.keep), short_error(e), "", "", "", "", ""]
        print(rows[str(scale)], flush=True)
        store.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    store.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    table = [rows["full"]] + sorted((r for k, r in rows.items() if k != "full"), key=lambda r: r[0])
    headers = ["keep scale", "keep", "computed", f"TTFT ms @{length}", "speedup", f"passkey % @{length}",
               f"ppl @{context}", "ppl ratio"]
    emit(a, "LazyLLM: speed/accuracy over keep fractions (SmolLM2-135M)", headers, table,
         f"pruning layers {setup['layers']}; TTFT {a.ttft_dtype}, accuracy {a.acc_dtype}, decode {a.decode}; rows "
         f"also in {store.name}; plot: {a.png}")
    plot(table, a.png, length, context)


def plot(rows, path: str, length: int, context: int):
    from lizard_jax.figures import pyplot, save_figure

    plt = pyplot()

    ok = [r for r in rows if isinstance(r[4], float)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, col, label in ((ax1, 5, f"passkey accuracy % ({length} tokens)"),
                           (ax2, 7, f"perplexity ratio lazy / full (128 after {context})")):
        ax.plot([r[4] for r in ok], [r[col] for r in ok], "o-")
        for r in ok:
            ax.annotate(str(r[0]), (r[4], r[col]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"TTFT speedup at {length} tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    save_figure(fig, path, title="LazyLLM on SmolLM2-135M: keep fractions scaled (label = scale)")
    print(f"wrote {path}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    floats = lambda s: [float(x) for x in s.split(",") if x]
    ap.add_argument("--checkpoint", required=True, help="converted SmolLM2-135M checkpoint folder")
    ap.add_argument("--text", default=str(WIKITEXT), help="perplexity and passkey filler text")
    ap.add_argument("--parts", default="ttft,accuracy,curve")
    ap.add_argument("--models", default="smollm2,llama1b")
    ap.add_argument("--lengths", type=ints, default=[4096, 8192, 16384, 32768])
    ap.add_argument("--passkey-lengths", type=ints, default=[4096, 8192])
    ap.add_argument("--ppl-contexts", type=ints, default=[2048, 4096, 8192])
    ap.add_argument("--layers", type=ints, default=[], help="pruning layers (default: LazyConfig.default)")
    ap.add_argument("--keep", type=floats, default=[], help="keep fractions, one per pruning layer")
    ap.add_argument("--schedules", type=parse_schedules, default=None,
                    help='several named schedules in one run, e.g. "gentle=15,22:0.8,0.6;default;'
                         'aggressive=2,8,15:0.4,0.2,0.1" (a bare "default": LazyConfig.default); replaces '
                         "--layers/--keep")
    ap.add_argument("--decode", default="attend_all", choices=["attend_all", "paper"],
                    help="LazyConfig.decode for the accuracy part and the curve")
    ap.add_argument("--scales", type=floats, default=[0.6, 1.0, 1.5, 2.0])
    ap.add_argument("--curve-length", type=int, default=8192)
    ap.add_argument("--curve-context", type=int, default=4096)
    ap.add_argument("--trials", type=int, default=2, help="passkey trials per depth")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows per context length")
    ap.add_argument("--batch", type=int, default=5, help="passkey prompts per generate call")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--acc-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ttft-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="dtype of the ttft part and the curve's timings (float32 on a CPU)")
    ap.add_argument("--no-report", action="store_true", help="print the tables only; do not append to RESULTS.md")
    ap.add_argument("--png", default=str(Path(__file__).resolve().parent / "lazyllm_curve.png"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.lengths, a.windows, a.reps, a.trials, a.scales = [4096, 8192], 4, 3, 1, [0.6, 1.0, 2.0]
    if a.layers and len(a.layers) != len(a.keep):
        ap.error("--layers and --keep need one entry each per pruning layer")
    if a.schedules and a.layers:
        ap.error("give --schedules or --layers/--keep, not both")
    memo: dict = {}
    parts = a.parts.split(",")
    unknown = set(parts) - {"ttft", "accuracy", "curve", "ranks"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    if "ttft" in parts:
        part_ttft(a)
    if "accuracy" in parts:
        part_accuracy(a, memo)
    if "curve" in parts:
        part_curve(a, memo)
    if "ranks" in parts:
        part_ranks(a)


if __name__ == "__main__":
    main()
