"""Evaluate a lizard_jax checkpoint. Each task prints progress on stderr and, as the last line on stdout, one
JSON object with its results.

  python eval.py perplexity --checkpoint DIR --text FILE --seq-len 1024 [--max-tokens N]
  python eval.py passkey --checkpoint DIR --text FILE --lengths 4096,8192 [--depths 0,0.25,0.5,0.75,1]
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
    a = ap.parse_args(argv)
    result = a.fn(a)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
