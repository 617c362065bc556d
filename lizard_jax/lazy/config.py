"""The LazyLLM pruning schedule: where to prune, how much to keep, how shapes are bucketed."""

from __future__ import annotations

import dataclasses
import math

from lizard_jax.config import ConfigError


# The default schedule: prune once, after the layer at 2/3 of the depth, keeping 10% of the prompt. Measured on
# SmolLM2-135M (benchmarks/RESULTS.md, "LazyLLM: accuracy ..." and "... rank of the passkey ..."): its last token
# reads a passkey only at layers 19-22 of 30, so any pruning before them drops the key (the earlier default,
# after layers 4, 12, 21 keeping 50/25/15%, found 2 of 10 keys at 4K where full prefill found 9); pruning after
# layer 20 keeps every key and the perplexity, at 0.73 of the prefill's token x layer work. Another model reads
# elsewhere: `benchmarks/bench_lazyllm.py --parts ranks` shows where, before a schedule is chosen for it.
DEFAULT_DEPTHS = (0.67,)
DEFAULT_KEEP = (0.1,)
DECODE_MODES = ("attend_all", "paper")


@dataclasses.dataclass(frozen=True)
class LazyConfig:
    """A progressive pruning schedule (static: one hashable object, a jit argument).

    layers: the pruning layers, strictly increasing. At layer `l` every token still computed is scored by the
      attention of the last token to it (mean over all query heads); only the best-scored ones go on to layer
      `l + 1`, the others leave their layer-`l` output in the Aux Cache. The last token is always kept.
    keep: for each pruning layer, the fraction of the prompt (its padded width `P`) kept from the next layer
      on, in (0, 1] and non-increasing, so kept sets are nested with depth. Budgets are rounded up to a multiple
      of `bucket`, so a prompt bucket compiles one program.
    top_k: instead of `keep`, absolute token budgets (>= 1, non-increasing), capped at `P`.
    bucket: multiple that fraction budgets round up to.
    sink_tokens, recent_tokens: also always keep the first `sink_tokens` positions and the `recent_tokens` before
      the last token (not in the paper, whose only forced token is the last; both 0 there). They count toward
      the budget.
    pool: max-pool each score over this many neighbouring positions (odd) before ranking, so a span the last
      token attends to (a number split into digit tokens) is kept whole (SnapKV's pooling; not in LazyLLM: 1).
    revive_buckets: during decoding, the number of pruned tokens a step revives at a stage is rounded up to the
      next of these sizes (0 and the stage's budget are always added), so a decode step holds one compiled
      branch per size and a step that revives nothing costs what a plain decode step costs.
    decode: what a decoding step attends to after a pruning layer (both revive the same way: a token the newest
      token selects at a pruning layer that has no KV at the next layer resumes from its Aux Cache state).
      "paper" (LazyLLM's decoding): at each pruning layer the newest token's scores choose the `budget` prompt
        tokens (among those it attended to at that layer: kept sets stay nested) that take part from the next
        layer on; it and the revived tokens attend only to those (plus every generated token) until the next
        pruning layer. A token left out keeps its KV and may be chosen again at a later step. The keys are
        gathered, `[B, budget + generated]` per layer: static shapes, bucketed with the prompt.
      "attend_all" (the default): the scores only choose whom to revive (the top `budget` of every token with
        KV at the pruning layer); every token with KV at a layer is a key there. The same revival rule and budget,
        so about the same per-token compute as "paper", but every key that work produced is seen; "paper" reads
        only `budget + generated` keys per layer and step. The default: on SmolLM2 with the default schedule both
        modes kept full prefill's passkey and perplexity at 4K (benchmarks/RESULTS.md), and this one reads every key.

    `LazyConfig.default(num_layers)` is the measured default schedule (see `DEFAULT_DEPTHS`).
    """

    layers: tuple[int, ...]
    keep: tuple[float, ...] = ()
    top_k: tuple[int, ...] = ()
    bucket: int = 64
    sink_tokens: int = 0
    recent_tokens: int = 0
    pool: int = 1
    revive_buckets: tuple[int, ...] = (16, 128, 1024)
    decode: str = "attend_all"

    def __post_init__(self):
        for name in ("layers", "keep", "top_k", "revive_buckets"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if any(int(l) != l for l in self.layers):
            raise ConfigError(f"LazyConfig.layers must be integers, got {self.layers}")
        if any(l < 0 for l in self.layers):
            raise ConfigError(f"LazyConfig.layers must be >= 0, got {self.layers}")
        if any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ConfigError(f"LazyConfig.layers must be strictly increasing (sorted, no repeats), got {self.layers}")
        if self.keep and self.top_k:
            raise ConfigError("LazyConfig: give either keep (fractions) or top_k (token budgets), not both")
        budgets = self.keep or self.top_k
        if len(budgets) != len(self.layers):
            what = "keep" if self.keep or not self.top_k else "top_k"
            raise ConfigError(f"LazyConfig.{what} has {len(budgets)} entries for {len(self.layers)} pruning layers "
                              f"{self.layers}")
        if self.keep and any(not 0 < f <= 1 for f in self.keep):
            raise ConfigError(f"LazyConfig.keep fractions must be in (0, 1], got {self.keep}")
        if self.top_k and any(int(k) != k or k < 1 for k in self.top_k):
            raise ConfigError(f"LazyConfig.top_k budgets must be integers >= 1, got {self.top_k}")
        if any(b > a for a, b in zip(budgets, budgets[1:])):
            raise ConfigError(f"LazyConfig.{'keep' if self.keep else 'top_k'} must be non-increasing (kept sets are "
                              f"nested with depth), got {budgets}")
        if self.sink_tokens < 0 or self.recent_tokens < 0:
            raise ConfigError(f"LazyConfig.sink_tokens and recent_tokens must be >= 0, got {self.sink_tokens}, "
                              f"{self.recent_tokens}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ConfigError(f"LazyConfig.pool must be an odd number >= 1, got {self.pool}")
        if self.decode not in DECODE_MODES:
            raise ConfigError(f"LazyConfig.decode must be one of {DECODE_MODES}, got {self.decode!r}")
        if self.bucket < 1:
            raise ConfigError(f"LazyConfig.bucket must be >= 1, got {self.bucket}")
        if any(b < 1 for b in self.revive_buckets) or any(
                b <= a for a, b in zip(self.revive_buckets, self.revive_buckets[1:])):
            raise ConfigError(f"LazyConfig.revive_buckets must be positive and strictly increasing, got "
                              f"{self.revive_buckets}")

    @classmethod
    def default(cls, num_layers: int, **overrides) -> "LazyConfig":
        """The default schedule for a model of `num_layers` layers: `DEFAULT_KEEP` after the layers at the relative
        depths `DEFAULT_DEPTHS` (rounded; repeats merged)."""
        layers, keep = [], []
        for depth, f in zip(DEFAULT_DEPTHS, DEFAULT_KEEP):
            layer = min(round(depth * num_layers), num_layers - 2)
            if layer >= 0 and (not layers or layer > layers[-1]):
                layers.append(layer)
                keep.append(f)
        return cls(layers=tuple(layers), keep=tuple(keep), **overrides)

    def check(self, num_layers: int) -> None:
        """Raise if a pruning layer does not exist in a model of `num_layers` layers (the last layer cannot prune:
        no layer follows it)."""
        bad = [l for l in self.layers if l >= num_layers - 1]
        if bad:
            raise ConfigError(f"LazyConfig.layers {bad} out of range: a model of {num_layers} layers prunes at layers "
                              f"0..{num_layers - 2}")

    def budgets(self, prompt_len: int) -> tuple[int, ...]:
        """Tokens kept after each pruning layer for a prompt (padded) of `prompt_len` tokens."""
        if self.top_k:
            return tuple(min(int(k), prompt_len) for k in self.top_k)
        return tuple(min(prompt_len, -(-math.ceil(f * prompt_len) // self.bucket) * self.bucket) for f in self.keep)

    def stages(self, num_layers: int) -> tuple[tuple[int, int], ...]:
        """[first, last] layer of each stage: the layers between two pruning points run on one token set."""
        self.check(num_layers)
        starts = (0, *(l + 1 for l in self.layers))
        ends = (*self.layers, num_layers - 1)
        return tuple(zip(starts, ends))

    def computed_fraction(self, prompt_len: int, num_layers: int) -> float:
        """Fraction of prompt-token x layers the prefill computes (padding counted as prompt)."""
        kept = (prompt_len, *self.budgets(prompt_len))
        return sum(n * (e - s + 1) for n, (s, e) in zip(kept, self.stages(num_layers))) / (prompt_len * num_layers)
