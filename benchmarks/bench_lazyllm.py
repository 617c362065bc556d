"""LazyLLM (`lizard_jax.lazy`) vs full prefill on one GPU: time to first token, and accuracy on SmolLM2.

    python benchmarks/bench_lazyllm.py --checkpoint CKPT [--text data/wikitext-2/valid.txt.xz]
    python benchmarks/bench_lazyllm.py ... --parts ttft         # one part per call: ttft, accuracy, curve
    python benchmarks/bench_lazyllm.py ... --quick              # fewer lengths, windows, reps and scales

Schedule: `LazyConfig.default(num_layers)` (SmolLM2, 30 layers: prune after layers 4, 12, 21 keeping 50%, 25%,
15% of the prompt), or --layers/--keep; the curve scales its keep fractions.

1. ttft: SmolLM2-135M (CKPT) and a random Llama-3.2-1B-shaped model, bf16, batch 1, random prompts of 4K..32K
   tokens. full = the model's own layers on every prompt token through plain KV caches, logits of the last token
   only; lazy = `lazy_prefill`. Both use the XLA attention path (explicit positions), caches of P + 128 slots,
   and return their caches; median of --reps after a compile run. "computed" = fraction of prompt-token x layers
   the lazy prefill computed (its counter). A config that fails (e.g. out of memory) shows the error.
2. accuracy (SmolLM2, --acc-dtype, default float32), full vs lazy with the same schedule:
   passkey: `lizard_jax.eval.passkey.build_prompt` prompts of exactly 4K / 8K tokens, key at 5 depths x --trials,
   filler from --text, greedy 8 tokens, correct if the first 5-digit number is the key; full = the plain
   `generate._generate`, lazy = `generate_lazy`.
   perplexity of the 128 tokens that follow 2K / 4K / 8K tokens of --text, at --windows evenly spaced offsets:
   full = one forward pass over context + 128; lazy = `lazy_logprobs` (the 128 tokens fed as decode steps,
   each step selecting and reviving tokens like generation does).
3. curve: keep fractions scaled by --scales: TTFT speedup at 8K vs passkey accuracy at 8K and perplexity ratio at
   4K, as a table and a PNG (--png).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lizard_jax  # noqa: E402
from benchmarks.common import WIKITEXT, device_name, report, time_jax  # noqa: E402
from lizard_jax.config import ModelConfig, RopeConfig  # noqa: E402
from lizard_jax.eval.passkey import build_prompt  # noqa: E402
from lizard_jax.generate import SamplingConfig, _generate, left_pad  # noqa: E402
from lizard_jax.lazy import LazyConfig, generate_lazy, lazy_logprobs, lazy_prefill  # noqa: E402
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


def passkey_accuracy(model, params, tok, filler, length: int, lazy: LazyConfig | None, *, trials: int,
                     batch: int, seed: int = 0) -> float:
    """Fraction of passkey prompts (5 depths x trials, exactly `length` tokens) answered right; lazy=None runs
    the plain generation. The same keys and filler slices for every schedule (seeded by length)."""
    rng = np.random.default_rng(seed + length)
    cases = []
    for depth in DEPTHS:
        for _ in range(trials):
            key = int(rng.integers(10000, 100000))
            start = int(rng.integers(0, max(1, len(filler) - length)))
            cases.append((build_prompt(tok, filler[start:], length, depth, key), key))
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


def continuation_ppl(model, params, ids, context: int, lazy: LazyConfig | None, *, windows: int) -> float:
    """Perplexity of the CONTINUATION tokens after `context` tokens, over `windows` evenly spaced windows (one
    batch)."""
    starts = np.linspace(0, len(ids) - context - CONTINUATION - 1, windows).astype(int)
    rows = jnp.asarray(np.stack([ids[s:s + context + CONTINUATION] for s in starts]).astype(np.int32))
    if lazy is None:
        lp = full_logprobs(model, params, rows, n=CONTINUATION)
    else:
        pos = jnp.broadcast_to(jnp.arange(context, dtype=jnp.int32), (windows, context))
        lp = lazy_logprobs(model, params, rows[:, :context], pos, rows[:, context:], lazy=lazy)[0]
    return math.exp(-np.asarray(lp, np.float64).mean())


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


def schedule(a, num_layers: int, scale: float = 1.0) -> LazyConfig:
    base = (LazyConfig(layers=tuple(a.layers), keep=tuple(a.keep)) if a.layers
            else LazyConfig.default(num_layers))
    return dataclasses.replace(base, keep=tuple(min(1.0, f * scale) for f in base.keep))


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
    rows = []
    for name in a.models.split(","):
        try:
            if name == "smollm2":
                model, params, _ = lizard_jax.load(a.checkpoint, dtype="bfloat16")
            else:
                cfg = ModelConfig(**LLAMA_1B, dtype="bfloat16", param_dtype="bfloat16")
                model = Transformer(cfg)
                params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
        except Exception as e:  # noqa: BLE001 - a table even if a model does not load
            rows.append([name, "-", short_error(e), "", "", "", ""])
            continue
        lazy = schedule(a, model.cfg.num_layers)
        for length in a.lengths:
            row = [name, length]
            try:
                full_ms, _ = ttft(model, params, length, None, a.reps)
            except Exception as e:  # noqa: BLE001
                full_ms, row = None, row + [short_error(e)]
            else:
                row.append(full_ms)
            try:
                lazy_ms, frac = ttft(model, params, length, lazy, a.reps)
                row += [lazy_ms, full_ms / lazy_ms if full_ms else "-", frac,
                        lazy.computed_fraction(length, model.cfg.num_layers)]
            except Exception as e:  # noqa: BLE001
                row += [short_error(e), "-", "-", "-"]
            row.append(f"{lazy.layers}/{lazy.keep}")
            rows.append(row)
            print(row, flush=True)
        del params
        gc.collect()
    headers = ["model", "prompt", "full ms", "lazy ms", "speedup", "computed (counter)", "computed (schedule)",
               "schedule layers/keep"]
    report("LazyLLM: time to first token, full vs lazy prefill (batch 1, bf16)", headers, rows,
           "prefill + last-token logits, caches kept; XLA attention in both; median of "
           f"{a.reps} after a compile run; target >= 2x at 8K and beyond")


def part_accuracy(a, memo: dict):
    model, params, tok = lizard_jax.load(a.checkpoint, dtype=a.acc_dtype)
    lazy = schedule(a, model.cfg.num_layers)
    text = read_text(a.text)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int32)
    rows = []
    for length in a.passkey_lengths:
        try:
            full = cached(memo, ("passkey", length, None), lambda: passkey_accuracy(
                model, params, tok, ids, length, None, trials=a.trials, batch=a.batch))
            got = cached(memo, ("passkey", length, lazy), lambda: passkey_accuracy(
                model, params, tok, ids, length, lazy, trials=a.trials, batch=a.batch))
            rows.append([f"passkey {length}", full * 100, got * 100, f"{(got - full) * 100:+.1f} pt",
                         "yes" if got >= full - 0.01 else "no"])
        except Exception as e:  # noqa: BLE001
            rows.append([f"passkey {length}", short_error(e), "", "", ""])
        print(rows[-1], flush=True)
    for context in a.ppl_contexts:
        try:
            full = cached(memo, ("ppl", context, None), lambda: continuation_ppl(
                model, params, ids, context, None, windows=a.windows))
            got = cached(memo, ("ppl", context, lazy), lambda: continuation_ppl(
                model, params, ids, context, lazy, windows=a.windows))
            rows.append([f"ppl of 128 after {context}", full, got, f"{(got / full - 1) * 100:+.2f} %",
                         "yes" if got <= full * 1.02 else "no"])
        except Exception as e:  # noqa: BLE001
            rows.append([f"ppl of 128 after {context}", short_error(e), "", "", ""])
        print(rows[-1], flush=True)
    report("LazyLLM: accuracy on SmolLM2-135M, full vs lazy prefill", ["task", "full", "lazy", "delta", "on target"],
           rows, f"schedule layers {lazy.layers} keep {lazy.keep}; {a.acc_dtype}; passkey: 5 depths x {a.trials} "
                 f"trials (accuracy %); ppl: {a.windows} windows of --text; targets: passkey within 1 point, ppl "
                 "within 2%")


def part_curve(a, memo: dict):
    """Rows accumulate in a JSON file beside the PNG (same length, context and layers), so the scales can be split
    over several calls and the PNG shows them all."""
    model, params, tok = lizard_jax.load(a.checkpoint, dtype=a.acc_dtype)
    fast = lizard_jax.load(a.checkpoint, dtype="bfloat16")[:2]
    text = read_text(a.text)
    ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int32)
    n = model.cfg.num_layers
    length, context = a.curve_length, a.curve_context
    store = Path(a.png).with_suffix(".json")
    setup = {"length": length, "context": context, "layers": list(schedule(a, n).layers), "device": device_name()}
    saved = json.loads(store.read_text()) if store.exists() else {}
    rows = saved.get("rows", {}) if saved.get("setup") == setup else {}
    if "full" not in rows:
        full_pk = cached(memo, ("passkey", length, None), lambda: passkey_accuracy(
            model, params, tok, ids, length, None, trials=a.trials, batch=a.batch))
        full_ppl = cached(memo, ("ppl", context, None), lambda: continuation_ppl(
            model, params, ids, context, None, windows=a.windows))
        rows["full"] = ["full", "-", 1.0, ttft(*fast, length, None, a.reps)[0], 1.0, full_pk * 100, full_ppl, 1.0]
    full_ms, full_ppl = rows["full"][3], rows["full"][6]
    for scale in a.scales:
        lazy = schedule(a, n, scale)
        try:
            ms, frac = ttft(*fast, length, lazy, a.reps)
            pk = cached(memo, ("passkey", length, lazy), lambda: passkey_accuracy(
                model, params, tok, ids, length, lazy, trials=a.trials, batch=a.batch))
            ppl = cached(memo, ("ppl", context, lazy), lambda: continuation_ppl(
                model, params, ids, context, lazy, windows=a.windows))
            rows[str(scale)] = [scale, str(lazy.keep), frac, ms, full_ms / ms, pk * 100, ppl, ppl / full_ppl]
        except Exception as e:  # noqa: BLE001
            rows[str(scale)] = [scale, str(lazy.keep), short_error(e), "", "", "", "", ""]
        print(rows[str(scale)], flush=True)
        store.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    store.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    table = [rows["full"]] + sorted((r for k, r in rows.items() if k != "full"), key=lambda r: r[0])
    headers = ["keep scale", "keep", "computed", f"TTFT ms @{length}", "speedup", f"passkey % @{length}",
               f"ppl @{context}", "ppl ratio"]
    report("LazyLLM: speed/accuracy over keep fractions (SmolLM2-135M)", headers, table,
           f"pruning layers {setup['layers']}; TTFT bf16, accuracy {a.acc_dtype}; rows also in {store.name}; "
           f"plot: {a.png}")
    plot(table, a.png, length, context)


def plot(rows, path: str, length: int, context: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.suptitle("LazyLLM on SmolLM2-135M: keep fractions scaled (label = scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    ap.add_argument("--scales", type=floats, default=[0.6, 1.0, 1.5, 2.0])
    ap.add_argument("--curve-length", type=int, default=8192)
    ap.add_argument("--curve-context", type=int, default=4096)
    ap.add_argument("--trials", type=int, default=2, help="passkey trials per depth")
    ap.add_argument("--windows", type=int, default=8, help="perplexity windows per context length")
    ap.add_argument("--batch", type=int, default=5, help="passkey prompts per generate call")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--acc-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--png", default=str(Path(__file__).resolve().parent / "lazyllm_curve.png"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.lengths, a.windows, a.reps, a.trials, a.scales = [4096, 8192], 4, 3, 1, [0.6, 1.0, 2.0]
    if a.layers and len(a.layers) != len(a.keep):
        ap.error("--layers and --keep need one entry each per pruning layer")
    memo: dict = {}
    parts = a.parts.split(",")
    unknown = set(parts) - {"ttft", "accuracy", "curve"}
    if unknown:
        ap.error(f"unknown parts {sorted(unknown)}")
    if "ttft" in parts:
        part_ttft(a)
    if "accuracy" in parts:
        part_accuracy(a, memo)
    if "curve" in parts:
        part_curve(a, memo)


if __name__ == "__main__":
    main()
