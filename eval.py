"""Evaluate a lizard_jax checkpoint. Each task prints progress on stderr and, as the last line on stdout, one
JSON object with its results.

  python eval.py perplexity --checkpoint DIR --text FILE --seq-len 1024 [--max-tokens N]
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
    a = ap.parse_args(argv)
    result = a.fn(a)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
