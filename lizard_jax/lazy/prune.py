"""LazyLLM prefill and decoding on the teacher's own layers, with static shapes.

Slots: every token owns one cache slot at every layer, the same index everywhere: prompt token `i` (of the
left-padded prompt, width `P`) is slot `i`, the `s`-th generated token slot `P + s`. A layer's cache holds a token
only if the token was computed at that layer; the others keep position -1 and are invisible, so attention by
absolute positions (`ops.softmax.visible`) needs nothing else, and RoPE is applied at the true positions.

The model is driven layer by layer (`Transformer.layers[i]` through `model.apply(method=...)`); the hook into
attention is the cache: a softmax layer calls `cache.attend(q, k, v, positions, ...)`, and `_View.attend` writes
the chunk's keys/values into their slots by scatter, attends, and for the scoring layers also returns the
attention of the chunk's last query (the last prompt token, or the newest token while decoding) to every key,
averaged over all query heads.

Prefill: the prompt runs through stage 0; at each pruning layer the top-`budget` tokens (by that score; the last
token always) are gathered and only they run the next stage, attending only among themselves (a compact
`[B, budget]` problem: gathers, not masks). Every token's hidden state at the end of a stage is written to the
Aux Cache (`aux`, one row per prompt token) and `depth` records how many layers it has computed.

Decoding: the new token runs every layer. At each pruning layer it scores every token computed there; the
selected ones that stopped at exactly that layer (`depth == layer + 1`) are revived: their hidden states come from
the Aux Cache and they run the next stage together with the new token, written into their slots. So a token is
computed at most once per layer over the whole generation (`counts` proves it). The number revived per step is
rounded up to a size of `LazyConfig.revive_buckets` and `lax.switch` picks the branch: one program per prompt
bucket, and a step that revives nothing costs a plain decode step.

What a decoding step attends to is `LazyConfig.decode`. "attend_all": the scores only choose whom to revive; every
token with KV at a layer is a key there. "paper" (LazyLLM's decoding): at each pruning layer the newest token's
scores (over the prompt tokens it attended to there) choose the `budget` prompt tokens that take part in the next
stage; the new token and the revived tokens attend only to those and to the generated tokens, whose slots are
gathered into `[B, budget + generated]` keys per layer (`_View.key_slots`). A token left out keeps its KV and
takes part again whenever a later step chooses it. `LazyState.active` records each stage's keys of the last step.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp

from lizard_jax.decode import SamplingConfig, decode_loop
from lizard_jax.lazy.config import LazyConfig
from lizard_jax.models import Transformer
from lizard_jax.ops.softmax import attention, visible

Array = jax.Array


@flax.struct.dataclass
class LazyState:
    """What a lazy generation carries. `S` slots = prompt width `P` + generated tokens; `L` layers.

    Caches are stacked per segment (a run of layers of one stage with one attention spec, see `segments`):
    k, v `[layers, B, S, kv_heads, head_dim]`; pos `[layers, B, S]` int32, the token's position if it was computed
    at that layer, else -1 (`kv(i)` gives layer i's). aux `[B, P, d_model]`: a prompt token's hidden state after
    its last computed layer (the Aux Cache; meaningful where depth < L). depth `[B, S]` int32: layers computed.
    slot_pos `[B, S]`: the true position of each slot's token (-1: padding or not generated yet). counts
    `[L, B, S]` int32: how often each token was computed at each layer (never above 1). step: tokens generated.
    active `[stages, B, P]` bool: the prompt tokens that were keys at each stage's layers in the latest step
    (prefill: the kept sets; decode "paper": the newest token's choice; "attend_all": every token with KV there).
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    pos: tuple[Array, ...]
    aux: Array
    depth: Array
    slot_pos: Array
    counts: Array
    step: Array
    active: Array
    segments: tuple[tuple[int, int], ...] = flax.struct.field(pytree_node=False, default=())

    def kv(self, layer: int) -> tuple[Array, Array, Array]:
        """(k, v, pos) of one layer."""
        for s, (first, last) in enumerate(self.segments):
            if first <= layer <= last:
                return self.k[s][layer - first], self.v[s][layer - first], self.pos[s][layer - first]
        raise ValueError(f"no layer {layer} in segments {self.segments}")

    def layer_fractions(self) -> Array:
        """`[L]` float32: at each layer, the fraction of the real prompt tokens computed there so far."""
        p = self.aux.shape[1]
        real = self.slot_pos[:, :p] >= 0
        done = jnp.sum(jnp.where(real[None], self.counts[:, :, :p], 0), axis=(1, 2))
        return done / jnp.maximum(jnp.sum(real), 1).astype(jnp.float32)

    def computed_fraction(self) -> Array:
        """Fraction of (real prompt token, layer) pairs computed so far, float32 scalar."""
        return jnp.mean(self.layer_fractions())


@flax.struct.dataclass
class _View:
    """One layer's cache as the layer sees it during a lazy chunk (see `KVCache.attend` for the protocol).

    k, v, pos: the segment's stacked caches and `layer`, this layer's index in them. slots `[B, T]`: where the
    chunk's tokens are written (an out-of-range slot, `S`, writes nothing). local: attend within the chunk only (a
    pruned prefill chunk: the cache holds nothing else yet). key_slots `[B, K]`: when given (decode "paper"), the
    keys are only these slots of the layer's cache, gathered after the chunk is written (`S`: no key).
    want_score: also return `score [B, keys]` (`[B, S]` in slot order with key_slots, 0 elsewhere), the mean over
    query heads of the last query's attention probabilities.
    """

    k: Array
    v: Array
    pos: Array
    layer: Array | int
    slots: Array
    score: Array | None = None
    key_slots: Array | None = None
    local: bool = flax.struct.field(pytree_node=False, default=False)
    want_score: bool = flax.struct.field(pytree_node=False, default=False)

    def attend(self, q, k_new, v_new, positions, *, window=None, sinks=None, scale=None, impl="xla"):
        b = jnp.arange(q.shape[0])[:, None]
        k_new = k_new.astype(self.k.dtype)
        v_new = v_new.astype(self.v.dtype)
        positions = positions.astype(jnp.int32)
        at = (self.layer, b, self.slots)
        k = self.k.at[at].set(k_new, mode="drop")
        v = self.v.at[at].set(v_new, mode="drop")
        pos = self.pos.at[at].set(positions, mode="drop")
        if self.local:
            keys = (k_new, v_new, positions)
        else:
            keys = tuple(jax.lax.dynamic_index_in_dim(a, self.layer, keepdims=False) for a in (k, v, pos))
            if self.key_slots is not None:
                ok = self.key_slots < keys[2].shape[1]
                idx = jnp.where(ok, self.key_slots, 0)
                keys = (jnp.take_along_axis(keys[0], idx[..., None, None], axis=1),
                        jnp.take_along_axis(keys[1], idx[..., None, None], axis=1),
                        jnp.where(ok, jnp.take_along_axis(keys[2], idx, axis=1), -1))
        o = attention(q, keys[0], keys[1], q_positions=positions, k_positions=keys[2], window=window, sinks=sinks,
                      scale=scale, impl=impl)
        score = self.score
        if self.want_score:
            score = last_query_scores(q[:, -1], keys[0], positions[:, -1], keys[2], window=window, sinks=sinks,
                                      scale=scale)
            if self.key_slots is not None and not self.local:  # back to slot order
                score = jnp.zeros(self.pos.shape[1:], jnp.float32).at[b, self.key_slots].set(score, mode="drop")
        return o, self.replace(k=k, v=v, pos=pos, score=score)


def last_query_scores(q, k, q_pos, k_pos, *, window=None, sinks=None, scale=None):
    """LazyLLM's importance: q `[B, H, D]` (one query), k `[B, S, KVH, D]`, q_pos `[B]`, k_pos `[B, S]` ->
    `[B, S]` float32, the attention probabilities averaged over the H query heads (GQA: each query head against
    its group's key head); invisible keys score 0."""
    bsz, h, d = q.shape
    kvh = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    qg = q.reshape(bsz, kvh, h // kvh, d)
    s = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) * scale
    ok = visible(q_pos[:, None], k_pos, causal=True, window=window)  # [B, 1, S]
    s = jnp.where(ok[:, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    if sinks is not None:  # sinks take their share of every head's denominator
        sink_lse = jax.nn.logsumexp(sinks.astype(jnp.float32), axis=-1).reshape(1, kvh, h // kvh, 1)
        lse = jnp.logaddexp(lse, sink_lse)
    return jnp.mean(jnp.exp(s - lse), axis=(1, 2))


# ----------------------------------------------------------------------------------------------------------


def _apply(model: Transformer, params, fn, *args):
    return model.apply({"params": params}, *args, method=fn)


def _embed(model, params, tokens):
    return _apply(model, params, lambda m, t: m.embed(t), tokens)


def _head(model, params, x):
    return _apply(model, params, lambda m, h: m.head(h), x)


def _segments(model: Transformer, lazy: LazyConfig) -> tuple[tuple[int, int], ...]:
    """[first, last] runs of layers inside one stage that share one attention spec (one scan body each)."""
    specs = model.cfg.attention
    out = []
    for first, last in lazy.stages(model.cfg.num_layers):
        start = first
        for i in range(first + 1, last + 2):
            if i > last or specs[i] != specs[start]:
                out.append((start, i - 1))
                start = i
    return tuple(out)


def stack_layers(model: Transformer, params, lazy: LazyConfig) -> tuple:
    """Per segment, its layers' parameters stacked on a leading axis: what decoding scans over."""
    return tuple(jax.tree.map(lambda *a: jnp.stack(a), *(params[f"layers_{i}"] for i in range(first, last + 1)))
                 for first, last in _segments(model, lazy))


def _run(model, params, stacked, state: LazyState, first: int, last: int, x, positions, slots, *, local: bool,
         score: bool, key_slots=None):
    """Layers first..last on the chunk x `[B, T, D]` (tokens at `positions`, written to `slots`) -> (x, the
    last layer's scores if `score` else None, state). With `stacked` (see `stack_layers`) each segment is one
    `lax.scan` (decoding: small programs), else the layers are unrolled (prefill: no stacked copy of the weights)."""
    b = jnp.arange(x.shape[0])[:, None]
    real = (positions >= 0).astype(jnp.int32)
    k, v, pos = list(state.k), list(state.v), list(state.pos)
    counts, sc = state.counts, None
    for s, (a, e) in enumerate(state.segments):
        if e < first or a > last:
            continue

        def layer(carry, j, lp, want, a=a):
            x, k, v, pos, counts, sc = carry
            view = _View(k, v, pos, j, slots, key_slots=key_slots, local=local, want_score=want)
            x, view = _apply_layer(model, a, lp, x, positions, view)
            counts = counts.at[a + j, b, slots].add(real, mode="drop")
            return x, view.k, view.v, view.pos, counts, view.score if want else sc

        carry = (x, k[s], v[s], pos[s], counts, sc)
        if stacked is None:
            for j in range(e - a + 1):
                carry = layer(carry, j, params[f"layers_{a + j}"], score and a + j == last)
        else:
            if score and e == last:  # the scan carries the score: start from an array of its shape
                keys = x.shape[1] if local else state.depth.shape[1]
                carry = carry[:5] + (jnp.zeros((x.shape[0], keys), jnp.float32),)
            want = score and e == last  # every layer scores (one query row: cheap); the last one's is kept
            carry, _ = jax.lax.scan(lambda c, xs: (layer(c, *xs, want), None), carry,
                                    (jnp.arange(e - a + 1), stacked[s]))
        x, k[s], v[s], pos[s], counts, sc = carry
    return x, sc, state.replace(k=tuple(k), v=tuple(v), pos=tuple(pos), counts=counts)


def _apply_layer(model, index: int, layer_params, x, positions, view):
    """Layer `index`'s module (any layer of its segment: same spec) with the given parameters."""
    return model.apply({"params": {f"layers_{index}": layer_params}}, x, positions, view,
                       method=lambda m, *a: m.layers[index](*a))


def _check(model: Transformer, tokens, positions, lazy: LazyConfig):
    cfg = model.cfg
    if not isinstance(lazy, LazyConfig):
        raise TypeError(f"lazy must be a LazyConfig, got {type(lazy).__name__}")
    lazy.check(cfg.num_layers)
    other = sorted({s.kind for s in cfg.attention} - {"softmax"})
    if other:
        raise ValueError(f"LazyLLM prunes softmax layers only; this model has {other} layers")
    if tokens.ndim != 2 or positions.shape != tokens.shape:
        raise ValueError(f"tokens and positions must both be [batch, prompt]: {tokens.shape=} {positions.shape=}")


def _init_state(model: Transformer, lazy: LazyConfig, positions, cache_len: int) -> LazyState:
    cfg = model.cfg
    bsz, p = positions.shape
    if cache_len < p:
        raise ValueError(f"{cache_len=} is shorter than the prompt ({p} tokens)")
    dtype = jnp.dtype(cfg.dtype)
    empty = jnp.full((bsz, cache_len), -1, jnp.int32)
    segments = _segments(model, lazy)
    kv = tuple(jnp.zeros((e - a + 1, bsz, cache_len, cfg.num_kv_heads, cfg.head_dim), dtype) for a, e in segments)
    n = cfg.num_layers
    return LazyState(
        k=kv, v=kv, pos=tuple(jnp.full((e - a + 1, bsz, cache_len), -1, jnp.int32) for a, e in segments),
        aux=jnp.zeros((bsz, p, cfg.d_model), dtype),
        depth=jnp.zeros((bsz, cache_len), jnp.int32),
        slot_pos=empty.at[:, :p].set(positions.astype(jnp.int32)),
        counts=jnp.zeros((n, bsz, cache_len), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        active=jnp.zeros((len(lazy.stages(n)), bsz, p), bool),
        segments=segments,
    )


def _prefill(model: Transformer, params, tokens, positions, lazy: LazyConfig, cache_len: int):
    """-> (logits of the last prompt token `[B, V]` float32, LazyState)."""
    _check(model, tokens, positions, lazy)
    n_layers = model.cfg.num_layers
    bsz, p = tokens.shape
    stages, budgets = lazy.stages(n_layers), lazy.budgets(p)
    state = _init_state(model, lazy, positions, cache_len)
    b = jnp.arange(bsz)[:, None]
    x = _embed(model, params, tokens)
    slots = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (bsz, p))
    pos = positions.astype(jnp.int32)
    for j, (first, last) in enumerate(stages):
        prune = j < len(budgets) and budgets[j] < x.shape[1]
        # the whole prompt attends through the cache exactly like a plain prefill; a pruned chunk only within itself
        x, score, state = _run(model, params, None, state, first, last, x, pos, slots, local=x.shape[1] < p,
                               score=prune)
        if not prune:
            continue
        state = state.replace(aux=state.aux.at[b, slots].set(x), depth=state.depth.at[b, slots].set(last + 1))
        # rank in slot (= position) order over the prompt, non-members of the chunk out, then back to the chunk
        if score.shape[1] == slots.shape[1]:
            score = jnp.zeros((bsz, p), jnp.float32).at[b, slots].set(score)
        key_pos = jnp.full((bsz, p), -1, jnp.int32).at[b, slots].set(pos)
        score = jnp.take_along_axis(_rank(lazy, score[:, :p], key_pos, pos[:, -1]), slots, axis=1)
        keep = jnp.sort(jax.lax.top_k(score, budgets[j])[1], axis=-1)  # position order: the last token stays last
        x = jnp.take_along_axis(x, keep[..., None], axis=1)
        slots = jnp.take_along_axis(slots, keep, axis=1)
        pos = jnp.take_along_axis(pos, keep, axis=1)
    state = state.replace(depth=state.depth.at[b, slots].set(n_layers),
                          active=jnp.stack([state.counts[f, :, :p] > 0 for f, _ in stages]))
    return _head(model, params, x[:, -1]), state


def _rank(lazy: LazyConfig, score, key_pos, last_pos):
    """Scores `[B, K]` of keys in slot order at `key_pos` (-1: not computed here) ready for top-k: max-pooled over
    `lazy.pool` neighbouring slots, -inf for non-candidates, +inf for the tokens always kept (the last one, the
    first `sink_tokens`, the `recent_tokens` before the last)."""
    if lazy.pool > 1:
        score = jax.lax.reduce_window(jnp.where(key_pos >= 0, score, 0.0), -jnp.inf, jax.lax.max, (1, lazy.pool),
                                      (1, 1), "SAME")
    last_pos = last_pos[:, None]
    always = (key_pos >= 0) & ((key_pos < lazy.sink_tokens) | (key_pos >= last_pos - lazy.recent_tokens))
    return jnp.where(always, jnp.inf, jnp.where(key_pos >= 0, score, -jnp.inf))


def _revive_sizes(lazy: LazyConfig, budget: int) -> tuple[int, ...]:
    return (0, *(r for r in lazy.revive_buckets if r < budget), budget)


def _stage_step(model, params, stacked, first: int, last: int, n_revive: int, score_next: bool, x, pos, slots,
                score, need, state: LazyState, key_slots=None):
    """One decode stage: the new token x `[B, 1, D]` plus the `n_revive` best-scored tokens of `need [B, S]`
    (fewer are real if fewer need it) -> (new token's x, next scores, state). key_slots: see `_View`."""
    b = jnp.arange(x.shape[0])[:, None]
    p, s = state.aux.shape[1], state.depth.shape[1]
    if n_revive:
        idx = jax.lax.top_k(jnp.where(need, score, -jnp.inf), n_revive)[1]
        ok = jnp.take_along_axis(need, idx, axis=1)
        r_slots = jnp.where(ok, idx, s)  # slot S: written nowhere
        r_pos = jnp.where(ok, jnp.take_along_axis(state.slot_pos, idx, axis=1), -1)
        r_x = jnp.take_along_axis(state.aux, jnp.minimum(idx, p - 1)[..., None], axis=1)
        x = jnp.concatenate([r_x.astype(x.dtype), x], axis=1)
        pos = jnp.concatenate([r_pos, pos], axis=1)
        slots = jnp.concatenate([r_slots, slots], axis=1)
    x, new_score, state = _run(model, params, stacked, state, first, last, x, pos, slots, local=False,
                               score=score_next, key_slots=key_slots)
    if n_revive:
        r_x = x[:, :n_revive]
        state = state.replace(aux=state.aux.at[b, r_slots].set(r_x.astype(state.aux.dtype), mode="drop"),
                              depth=state.depth.at[b, r_slots].set(last + 1, mode="drop"))
    return x[:, -1:], score if new_score is None else new_score, state


def _first_stage(model: Transformer, params, stacked, lazy: LazyConfig, tok, pos, state: LazyState):
    """Both decode modes' start of a step: the new token's slot and position, then the layers before the first
    pruning layer over every key with KV there. -> (P, stages, budgets, batch index `[B, 1]`, slots, pos,
    x, scores at the first pruning layer, state)."""
    n_layers = model.cfg.num_layers
    p = state.aux.shape[1]
    stages, budgets = lazy.stages(n_layers), lazy.budgets(p)
    bsz = tok.shape[0]
    slot = p + state.step
    slots = jnp.full((bsz, 1), slot, jnp.int32)
    pos = pos.astype(jnp.int32)
    state = state.replace(slot_pos=state.slot_pos.at[:, slot].set(pos[:, 0]),
                          depth=state.depth.at[:, slot].set(n_layers), step=state.step + 1)
    first, last = stages[0]
    x, score, state = _run(model, params, stacked, state, first, last, _embed(model, params, tok), pos, slots,
                           local=False, score=len(stages) > 1)
    return p, stages, budgets, jnp.arange(bsz)[:, None], slots, pos, x, score, state


def _step(model: Transformer, params, stacked, lazy: LazyConfig, tok, pos, state: LazyState):
    """decode_loop's step: tok, pos `[B, 1]` -> (logits `[B, 1, V]`, state). `stacked`: `stack_layers(...)`."""
    if lazy.decode == "paper":
        return _step_paper(model, params, stacked, lazy, tok, pos, state)
    p, stages, budgets, b, slots, pos, x, score, state = _first_stage(model, params, stacked, lazy, tok, pos, state)
    for j, (first, last) in enumerate(stages[1:]):
        score_next = j + 2 < len(stages)
        if budgets[j] == p:  # nothing was ever pruned before this stage: nothing to revive
            x, new_score, state = _run(model, params, stacked, state, first, last, x, pos, slots, local=False,
                                       score=score_next)
            score = score if new_score is None else new_score
            continue
        score = _rank(lazy, score, state.kv(first - 1)[2], pos[:, 0])
        chosen = jnp.zeros(score.shape, bool).at[b, jax.lax.top_k(score, budgets[j])[1]].set(True)
        need = chosen & (state.depth == first)  # selected, and stopped right before this stage
        sizes = _revive_sizes(lazy, budgets[j])
        branch = jnp.searchsorted(jnp.asarray(sizes), jnp.max(jnp.sum(need, axis=1)))
        branches = [functools.partial(_stage_step, model, params, stacked, first, last, r, score_next)
                    for r in sizes]
        x, score, state = jax.lax.switch(branch, branches, x, pos, slots, score, need, state)
    state = state.replace(active=jnp.stack([state.kv(f)[2][:, :p] >= 0 for f, _ in stages]))
    return _head(model, params, x), state


def _step_paper(model: Transformer, params, stacked, lazy: LazyConfig, tok, pos, state: LazyState):
    """`_step` in LazyLLM's decode mode: at each pruning layer the newest token's scores choose the `budget` prompt
    tokens (among the ones it attended to there) that take part in the next stage; the chosen ones without KV
    there are revived from the Aux Cache, and the stage's keys are gathered: the chosen prompt slots and every
    generated slot, `[B, budget + generated]`."""
    p, stages, budgets, b, slots, pos, x, score, state = _first_stage(model, params, stacked, lazy, tok, pos, state)
    s, bsz, last = state.depth.shape[1], tok.shape[0], stages[0][1]
    cand = state.kv(last)[2][:, :p] >= 0  # prompt tokens the new token attended to at the pruning layer
    active = [cand]
    generated = jnp.broadcast_to(jnp.arange(p, s, dtype=jnp.int32), (bsz, s - p))
    for j, (first, last) in enumerate(stages[1:]):
        score_next = j + 2 < len(stages)
        ranked = _rank(lazy, score[:, :p], jnp.where(cand, state.slot_pos[:, :p], -1), pos[:, 0])
        idx = jax.lax.top_k(ranked, budgets[j])[1]
        ok = jnp.take_along_axis(ranked, idx, axis=1) > -jnp.inf
        chosen = jnp.where(ok, idx, s)  # slot S: no key
        cand = jnp.zeros((bsz, p), bool).at[b, chosen].set(True, mode="drop")
        active.append(cand)
        revive = ok & (jnp.take_along_axis(state.depth, idx, axis=1) == first)  # chosen, no KV in this stage
        need = jnp.zeros((bsz, s), bool).at[b, jnp.where(revive, idx, s)].set(True, mode="drop")
        key_slots = jnp.concatenate([chosen, generated], axis=1)
        sizes = _revive_sizes(lazy, budgets[j])
        branch = jnp.searchsorted(jnp.asarray(sizes), jnp.max(jnp.sum(need, axis=1)))
        branches = [functools.partial(_stage_step, model, params, stacked, first, last, r, score_next,
                                      key_slots=key_slots) for r in sizes]
        x, score, state = jax.lax.switch(branch, branches, x, pos, slots, score, need, state)
    return _head(model, params, x), state.replace(active=jnp.stack(active))


# ----------------------------------------------------------------------------------------------------------
# Public entry points


@functools.partial(jax.jit, static_argnames=("model", "lazy", "cache_len"))
def lazy_prefill(model: Transformer, params, tokens, positions, *, lazy: LazyConfig, cache_len: int | None = None):
    """Pruned prefill of left-padded prompts. tokens, positions `[B, P]` int32 (positions -1 on padding) ->
    (logits of the last prompt token `[B, vocab]` float32, LazyState with `cache_len` slots, default P)."""
    return _prefill(model, params, tokens, positions, lazy, cache_len or tokens.shape[1])


@functools.partial(jax.jit, static_argnames=("model", "lazy", "max_new_tokens", "sampling", "eos_ids"))
def generate_lazy(model: Transformer, params, tokens, positions, key, *, lazy: LazyConfig, max_new_tokens: int,
                  sampling: SamplingConfig, eos_ids: tuple[int, ...]):
    """`generate._generate` with LazyLLM prefill and decoding: tokens, positions `[B, P]` (left-padded,
    positions -1 on padding) -> generated tokens `[B, max_new_tokens]` int32, -1 after a row's EOS."""
    logits, state = _prefill(model, params, tokens, positions, lazy, tokens.shape[1] + max_new_tokens)
    step = functools.partial(_step, model, params, stack_layers(model, params, lazy), lazy)
    return decode_loop(step, state, logits, jnp.max(positions, axis=1), key, max_new_tokens=max_new_tokens,
                       sampling=sampling, eos_ids=eos_ids)


@functools.partial(jax.jit, static_argnames=("model", "lazy"))
def lazy_logprobs(model: Transformer, params, tokens, positions, targets, *, lazy: LazyConfig):
    """Teacher-forced LazyLLM decoding: the log-probability of each of `targets [B, N]` given the prompt and the
    targets before it, the targets fed one decode step at a time exactly as generated tokens would be: the same
    step as `generate_lazy`'s (`_step`, which follows `lazy.decode`). -> (log-probs `[B, N]` float32, final
    LazyState)."""
    if targets.ndim != 2 or targets.shape[0] != tokens.shape[0]:
        raise ValueError(f"targets must be [batch, N] with the prompt's batch: {targets.shape=} {tokens.shape=}")
    logits, state = _prefill(model, params, tokens, positions, lazy, tokens.shape[1] + targets.shape[1])
    step = functools.partial(_step, model, params, stack_layers(model, params, lazy), lazy)

    def body(carry, tgt):  # tgt [B]
        logits, state, pos = carry
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tgt[:, None], axis=1)[:, 0]
        pos = pos + 1
        logits, state = step(tgt[:, None], pos[:, None], state)
        return (logits[:, -1], state, pos), lp

    carry = (logits, state, jnp.max(positions, axis=1).astype(jnp.int32))
    (_, state, _), lps = jax.lax.scan(body, carry, targets.T.astype(jnp.int32))
    return lps.T, state
