"""A Lizard student of the real SmolLM2-135M teacher (configs/lizard_smollm2.yaml): loads with the teacher's
weights, prefills and decodes 32 tokens on the CPU, and its decode memory does not grow with context length."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lizard_jax
from lizard_jax.config import load_yaml
from lizard_jax.convert import convert, shipped_smollm2
from lizard_jax.eval.speed import cache_bytes
from lizard_jax.models import Transformer, init_caches
from lizard_jax.numerics import rel_err
from lizard_jax.recipes import new_param_mask, student_config, student_params
from lizard_jax.textio import read_text

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT / "data" / "wikitext-2" / "valid.txt.xz"
NEW = {"feature_q/w", "feature_k/w", "gate/w", "gate/b", "meta_logits", "alpha", "gate_scale"}


def path_name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    ck = tmp_path_factory.mktemp("smollm2") / "ck"
    convert(shipped_smollm2(), ck)
    teacher, tparams, tok = lizard_jax.load(ck)
    recipe = load_yaml(ROOT / "configs" / "lizard_smollm2.yaml")
    scfg = student_config(teacher.cfg, recipe["student"]["attention"])
    sparams = jax.jit(student_params, static_argnums=0)(scfg, tparams, jax.random.key(0))
    return teacher, tparams, tok, scfg, sparams


def test_student_loads_teacher_weights(student):
    teacher, tparams, _, scfg, sparams = student
    assert scfg.kinds == ("lizard",) * 30 and (scfg.num_heads, scfg.num_kv_heads, scfg.head_dim) == (9, 3, 64)
    flat = {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(sparams)}
    for path, v in jax.tree_util.tree_leaves_with_path(tparams):
        np.testing.assert_array_equal(flat[path_name(path)], v, err_msg=path_name(path))
    new = {path_name(p) for p, m in jax.tree_util.tree_leaves_with_path(new_param_mask(sparams, tparams)) if m}
    assert new == {f"layers_{i}/attn/{n}" for i in range(30) for n in NEW}
    assert flat["layers_0/attn/feature_q/w"].shape == (9, 64, 64)  # 2 x 64 = 128 features
    assert flat["layers_0/attn/meta_logits"].shape == (9, 4)


def test_prefill_and_32_decoding_steps(student):
    """Prefill 200 real tokens (longer than the 128-token window) into fixed caches, then 32 greedy steps; the
    cached logits equal one full forward pass over prompt + generated tokens."""
    _, _, tok, scfg, sparams = student
    model = Transformer(scfg)
    ids = tok(read_text(WIKI)[:4000], add_special_tokens=False)["input_ids"][:200]
    prompt = jnp.asarray([ids], jnp.int32)
    n, steps = prompt.shape[1], 32
    run = jax.jit(lambda t, p, c: model.apply({"params": sparams}, t, p, c))
    logits, caches = run(prompt, jnp.arange(n, dtype=jnp.int32)[None], init_caches(scfg, 1, n + steps))
    out, got = [], [logits]
    for i in range(steps):
        nxt = jnp.argmax(logits[:, -1], axis=-1)[:, None].astype(jnp.int32)
        out.append(nxt)
        logits, caches = run(nxt, jnp.full((1, 1), n + i, jnp.int32), caches)
        got.append(logits)
    assert np.all(np.isfinite(np.asarray(jnp.concatenate(got, axis=1))))
    seq = jnp.concatenate([prompt] + out, axis=1)  # the last generated token was fed too
    full = jax.jit(lambda t: model.apply({"params": sparams}, t))(seq)
    err = rel_err(jnp.concatenate(got, axis=1), full)
    print(f"\nLizard student (untrained new params): cached vs full logits rel err {err:.2e}; "
          f"generated {tok.decode(np.asarray(seq[0, n:]).tolist())!r}")
    assert err < 1e-4


def test_decode_cache_bytes_constant_in_context_length(student):
    """The student's decode state does not grow with context (a Lizard state per head + a 128-slot window); the
    teacher's KV cache grows by exactly its K, V and position per token and is far larger at 8K."""
    teacher, _, _, scfg, _ = student
    tcfg = teacher.cfg
    s1k, s8k = cache_bytes(scfg, 1, 1024), cache_bytes(scfg, 1, 8192)
    t1k, t8k = cache_bytes(tcfg, 1, 1024), cache_bytes(tcfg, 1, 8192)
    print(f"\ndecode cache bytes: Lizard {s1k} at 1K, {s8k} at 8K; softmax teacher {t1k} at 1K, {t8k} at 8K")
    assert s1k == s8k
    itemsize = jnp.dtype(tcfg.dtype).itemsize
    per_token = tcfg.num_layers * (2 * tcfg.num_kv_heads * tcfg.head_dim * itemsize + 4)  # K, V; int32 position
    assert t8k - t1k == (8192 - 1024) * per_token
    assert s8k < t8k / 20 and s8k < t1k  # state 9 x 128 x 65 fp32 + window 128 per layer vs 8K of KV
