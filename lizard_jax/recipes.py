"""Recipes: a student config from a teacher config, and the student's parameters from the teacher's.

A recipe's `attention` section says which attention each layer gets:

    attention:
      default: {kind: lizard, window: 64}       # every layer, unless...
      pattern: [sparse, lightning, lightning, lightning]   # ...a repeating pattern is given
      layers: {0: softmax, 29: {kind: softmax}}  # explicit per-layer overrides (win over both)

Student layers keep the teacher's projection names (q_proj/k_proj/v_proj/o_proj) and MLPs, so their weights
are copied unchanged; only the new parameters (feature maps, gates, meta tokens, norms) come from the student's
own initialisation.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from lizard_jax.config import ConfigError, ModelConfig, spec_from_any
from lizard_jax.layers import layer_class
from lizard_jax.layers.common import dtype_of
from lizard_jax.models import Transformer

_KEYS = {"default", "pattern", "layers"}


def student_config(teacher: ModelConfig, attention: Mapping[str, Any], **overrides) -> ModelConfig:
    """The teacher's config with the recipe's per-layer attention schedule (and any field overrides)."""
    if not isinstance(attention, Mapping):
        raise ConfigError(f"recipe attention must be a mapping with keys {sorted(_KEYS)}, got {attention!r}")
    unknown = set(attention) - _KEYS
    if unknown:
        raise ConfigError(f"recipe attention: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    n = teacher.num_layers
    specs = list(teacher.attention)
    if "default" in attention:
        specs = [spec_from_any(attention["default"], "attention.default")] * n
    if "pattern" in attention:
        pattern = [spec_from_any(s, f"attention.pattern[{i}]") for i, s in enumerate(attention["pattern"])]
        if not pattern:
            raise ConfigError("recipe attention.pattern is empty")
        specs = [pattern[i % len(pattern)] for i in range(n)]
    for key, s in (attention.get("layers") or {}).items():
        i = int(key)
        if not -n <= i < n:
            raise ConfigError(f"recipe attention.layers: layer {key} out of range for {n} layers")
        specs[i] = spec_from_any(s, f"attention.layers[{key}]")
    return teacher.replace(attention=tuple(specs), **overrides)


TEACHER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def student_params(student: ModelConfig, teacher_params, key, *, dtype: str | None = None):
    """Student parameters: every teacher parameter the student also has (same path and shape) is copied;
    the rest are initialised by the student's modules. Teacher parameters the student lacks are dropped.
    The student's attention projections (`TEACHER_PROJECTIONS`) must come from the teacher: a teacher without
    them (or with other shapes) is a ConfigError, not a silently random layer."""
    model, tokens = Transformer(student), jnp.zeros((1, 8), jnp.int32)
    flat_t = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(teacher_params)[0]}
    abstract = nn.unbox(jax.eval_shape(model.init, key, tokens)["params"])  # checked before the costly init
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]

    def from_teacher(path, x):
        old = flat_t.get(jax.tree_util.keystr(path))
        return old is not None and old.shape == x.shape

    missing = []
    for path, x in leaves:
        if any(getattr(p, "key", None) in TEACHER_PROJECTIONS for p in path) and not from_teacher(path, x):
            old = flat_t.get(jax.tree_util.keystr(path))
            have = "absent" if old is None else f"shape {old.shape}"
            missing.append(f"{'/'.join(str(getattr(p, 'key', p)) for p in path)} {x.shape} ({have})")
    if missing:
        raise ConfigError(f"the teacher lacks {len(missing)} attention projection(s) the student needs, e.g. "
                          f"{missing[:3]}: a recipe converts a softmax teacher whose layers have "
                          f"{'/'.join(TEACHER_PROJECTIONS)} of the student's shapes")
    # Only the attention layers differ from the teacher: initialise each on its own, one compile per distinct spec
    # (a whole-model init of a 30-layer teacher compiles for a minute on a CPU). A student with other new
    # parameters falls back to the whole model's init.
    attn_only = all(from_teacher(p, x) or _in_attention(p) for p, x in leaves)
    if attn_only:
        todo = sorted({int(p[0].key.removeprefix("layers_")) for p, x in leaves if not from_teacher(p, x)})
        inits: dict = {}
        x0 = jnp.zeros((1, 8, student.d_model), dtype_of(student.dtype))
        for i in todo:
            spec = student.attention[i]
            if spec not in inits:
                layer = layer_class(spec.kind)(student, spec)
                inits[spec] = jax.jit(lambda k, layer=layer: nn.unbox(layer.init(k, x0, None, None)["params"]))
        init = {f"layers_{i}": {"attn": inits[student.attention[i]](jax.random.fold_in(key, i))} for i in todo}
    else:  # jitted: an eager init of the whole model takes about twice as long
        init = nn.unbox(jax.jit(model.init)(key, tokens)["params"])

    def pick(path, x):
        if from_teacher(path, x):
            x = flat_t[jax.tree_util.keystr(path)]
        else:
            x = _get(init, path)
        return x.astype(dtype) if dtype else x

    return jax.tree_util.tree_map_with_path(pick, abstract)


def _in_attention(path) -> bool:
    """Whether a parameter path lies under layers_i/attn."""
    keys = [getattr(p, "key", None) for p in path]
    return len(keys) > 2 and str(keys[0]).startswith("layers_") and keys[1] == "attn"


def _get(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


def new_param_mask(student_params_tree, teacher_params) -> Any:
    """Boolean tree: True where a student parameter is not a (same-shaped) teacher parameter."""
    flat_t = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(teacher_params)[0]}
    return jax.tree_util.tree_map_with_path(
        lambda p, x: flat_t.get(jax.tree_util.keystr(p)) != x.shape, student_params_tree
    )
