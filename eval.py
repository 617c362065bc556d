"""Evaluate a lizard_jax checkpoint. Each task prints progress on stderr and, as the last line on stdout, one
JSON object with its results.

  python eval.py perplexity --checkpoint DIR --text FILE --seq-len 1024 [--max-tokens N]
  python eval.py passkey --checkpoint DIR --text FILE --lengths 4096,8192 [--depths 0,0.25,0.5,0.75,1]
  python eval.py mqar --checkpoint DIR [--pairs 8,32,128] [--lengths 1024,4096] [--queries 16] [--trials 10]
  python eval.py speed --checkpoint [LABEL=]DIR [--checkpoint ...] [--random [LABEL=]CONFIG.json]
      [--contexts 1024,2048,4096] [--decode-tokens 64] [--batch 1] [--dtype bfloat16] [--isolate] [--plot out.png]
      [--merge earlier_speed.json ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_common(p):
    p.add_argument("--checkpoint", required=True, help="lizard_jax checkpoint folder")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype override")


def cmd_perplexity(a) -> dict:
    import lizard_jax
    from lizard_jax.eval.perplexity import perplexity

    model, params, tok = lizard_jax.load(a.checkpoint, dtype=a.dtype)
    if tok is None:
        raise SystemExit(f"error: {a.checkpoint} has no tokenizer/ folder; cannot tokenize {a.text}")
    text = Path(a.text).read_text(encoding="utf-8")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = perplexity(model, params, ids, seq_len=a.seq_len, max_tokens=a.max_tokens, batch_size=a.batch_size)
    out.update(checkpoint=str(a.checkpoint), text=str(a.text))
    return out


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def cmd_passkey(a) -> dict:
    import lizard_jax
    from lizard_jax.eval.passkey import passkey

    model, params, tok = lizard_jax.load(a.checkpoint, dtype=a.dtype)
    if tok is None:
        raise SystemExit(f"error: {a.checkpoint} has no tokenizer/ folder")
    out = passkey(model, params, tok, Path(a.text).read_text(encoding="utf-8"), lengths=_ints(a.lengths),
                  depths=_floats(a.depths), trials=a.trials, seed=a.seed)
    out.update(checkpoint=str(a.checkpoint))
    return out


def cmd_mqar(a) -> dict:
    import lizard_jax
    from lizard_jax.eval.mqar import mqar

    model, params, tok = lizard_jax.load(a.checkpoint, dtype=a.dtype)
    if tok is None:
        raise SystemExit(f"error: {a.checkpoint} has no tokenizer/ folder")
    try:
        out = mqar(model, params, tok, pairs=a.pairs, lengths=a.lengths, num_queries=a.queries, trials=a.trials,
                   batch_size=a.batch_size, seed=a.seed)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out.update(checkpoint=str(a.checkpoint))
    return out


def _read_speed(path: str) -> dict:
    """A previous `eval.py speed` result: a file whose last non-empty line is its JSON object."""
    lines = [x for x in Path(path).read_text().splitlines() if x.strip()] if Path(path).is_file() else []
    try:
        out = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        out = None
    if not isinstance(out, dict) or out.get("task") != "speed":
        raise SystemExit(f"error: {path} does not end with an eval.py speed JSON line")
    return out


def cmd_speed(a) -> dict:
    from lizard_jax.eval.speed import ModelSource, SpeedOptions, plot_speed, speed_sources

    try:
        sources = [ModelSource.parse("checkpoint", x) for x in a.checkpoint or []]
        sources += [ModelSource.parse("random", x) for x in a.random or []]
        if not sources and not a.merge:
            raise ValueError("give at least one --checkpoint, --random or --merge")
        if sources:
            opts = SpeedOptions(batch=a.batch, decode_tokens=a.decode_tokens, warmup=a.warmup, reps=a.reps)
            out = speed_sources(sources, a.contexts, opts, dtype=a.dtype, isolate=a.isolate)
        else:
            out = None
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    for path in a.merge or []:  # earlier runs (e.g. one model per command), on the same device and options
        old = _read_speed(path)
        if out is None:
            out = old
            continue
        for key in ("device", "options"):
            if old[key] != out[key]:
                raise SystemExit(f"error: {path} was measured with {key} {old[key]}, this run with {out[key]}")
        clash = sorted(set(old["models"]) & set(out["models"]))
        if clash:
            raise SystemExit(f"error: {path} repeats model label(s) {clash}; name models with LABEL=PATH")
        out["models"].update(old["models"])
        out["contexts"] = sorted(set(out["contexts"]) | set(old["contexts"]))
    if a.plot:
        opts = out["options"]
        title = (f"{out['device']}, batch {opts['batch']}, {opts['decode_tokens']} decode tokens, "
                 f"median of {opts['reps']}")
        out["plot"] = str(plot_speed(out["models"], a.plot, title=title))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="task", required=True)
    p = sub.add_parser("perplexity", help="perplexity over non-overlapping windows of a text file")
    _add_common(p)
    p.add_argument("--text", required=True)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.set_defaults(fn=cmd_perplexity)
    p = sub.add_parser("passkey", help="passkey retrieval at several lengths and depths")
    _add_common(p)
    p.add_argument("--text", required=True, help="filler text file")
    p.add_argument("--lengths", default="4096", help="comma-separated prompt lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="comma-separated depths in [0, 1]")
    p.add_argument("--trials", type=int, default=1, help="trials per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_passkey)
    p = sub.add_parser("mqar", help="multi-query associative recall over single-token key-value pairs")
    _add_common(p)
    p.add_argument("--pairs", type=_ints, default=[8, 32, 128], help="comma-separated numbers of pairs")
    p.add_argument("--lengths", type=_ints, default=[],
                   help="comma-separated prompt lengths in tokens, filled with as many pairs as fit")
    p.add_argument("--queries", type=int, default=16, help="queries per prompt (at most the number of pairs)")
    p.add_argument("--trials", type=int, default=10, help="prompts per setting")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_mqar)
    p = sub.add_parser("speed", help="prefill / decode speed and memory vs context, several models side by side")
    p.add_argument("--checkpoint", action="append", metavar="[LABEL=]DIR", help="checkpoint folder (repeatable)")
    p.add_argument("--random", action="append", metavar="[LABEL=]CONFIG",
                   help="ModelConfig JSON file measured with random parameters (repeatable)")
    p.add_argument("--contexts", type=_ints, default=[1024, 2048, 4096, 8192], help="comma-separated lengths")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps timed after each prefill")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    p.add_argument("--reps", type=int, default=5, help="timed calls (the median is reported)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute and parameter dtype (parameters are cast, as served); default: the checkpoint's")
    p.add_argument("--isolate", action="store_true",
                   help="one fresh subprocess per (model, context): peak_bytes is that context's own")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="earlier speed results (files ending with their JSON line) to add to the table/plot")
    p.set_defaults(fn=cmd_speed)
    a = ap.parse_args(argv)
    result = a.fn(a)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
