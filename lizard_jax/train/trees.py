"""Splitting a parameter tree into trainable and frozen parts, and joining them again."""

from __future__ import annotations


def split(params, mask):
    """(selected, rest): two nested dicts holding the leaves where `mask` is True / False (empty dicts pruned)."""
    sel, rest = {}, {}
    for k, v in params.items():
        m = mask[k]
        if isinstance(v, dict):
            a, b = split(v, m)
            if a:
                sel[k] = a
            if b:
                rest[k] = b
        elif m:
            sel[k] = v
        else:
            rest[k] = v
    return sel, rest


def join(a, b):
    """Deep union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for k, v in b.items():
        if k in out and isinstance(out[k], dict) and isinstance(v, dict):
            out[k] = join(out[k], v)
        elif k in out:
            raise ValueError(f"key {k!r} present in both trees")
        else:
            out[k] = v
    return out
