"""LazyLLM on the real SmolLM2-135M-Instruct (slow): keep 1.0 == plain generation, the gather path == the masked
spec on real text, and the counter over a real generation with revival."""

from pathlib import Path

import jax
import numpy as np
import pytest

import lizard_jax
from lizard_jax.generate import SamplingConfig, _generate, left_pad
from lizard_jax.lazy import LazyConfig, generate_lazy, lazy_logprobs, lazy_prefill, prefill_reference
from lizard_jax.numerics import FORMS_RTOL, assert_close
from lizard_jax.textio import read_text

pytestmark = pytest.mark.slow
WIKI = Path(__file__).resolve().parents[1] / "data" / "wikitext-2" / "valid.txt.xz"
GREEDY = SamplingConfig()


@pytest.fixture(scope="module")
def smollm2(smollm2):
    """conftest's converted teacher, loaded, with two left-padded prompts of real text."""
    model, params, tok = lizard_jax.load(smollm2[2])
    ids = tok(read_text(WIKI)[:20000], add_special_tokens=False)["input_ids"]
    toks, pos = left_pad([ids[:500], ids[1000:1300]], model.cfg.pad_token_id)
    return model, params, tok, toks, pos


def test_keep_one_is_plain_generation(smollm2):
    model, params, _, toks, pos = smollm2
    lazy = LazyConfig(layers=(4, 12, 20), keep=(1.0, 1.0, 1.0))
    ref = _generate(model, params, toks, pos, jax.random.key(0), max_new_tokens=16, sampling=GREEDY, eos_ids=(),
                    cache_len=toks.shape[1] + 16)
    out = generate_lazy(model, params, toks, pos, jax.random.key(0), lazy=lazy, max_new_tokens=16, sampling=GREEDY,
                        eos_ids=())
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_default_prefill_matches_masked_spec(smollm2):
    model, params, _, toks, pos = smollm2
    lazy = LazyConfig.default(model.cfg.num_layers)
    ref = prefill_reference(model, params, toks, pos, lazy)
    logits, st = lazy_prefill(model, params, toks, pos, lazy=lazy)
    assert_close(logits, ref["logits"], rtol=FORMS_RTOL, name="last logits")
    np.testing.assert_array_equal(np.asarray(st.counts[:, :, :toks.shape[1]]), np.asarray(ref["active"], np.int32))


def test_real_generation_counter(smollm2):
    model, params, _, toks, pos = smollm2
    lazy = LazyConfig.default(model.cfg.num_layers)
    out = generate_lazy(model, params, toks, pos, jax.random.key(0), lazy=lazy, max_new_tokens=24, sampling=GREEDY,
                        eos_ids=())
    lp, st = lazy_logprobs(model, params, toks, pos, out, lazy=lazy)
    _, st0 = lazy_prefill(model, params, toks, pos, lazy=lazy)
    p = toks.shape[1]
    counts = np.asarray(st.counts)
    assert counts.max() == 1
    assert counts[:, :, :p].sum() > np.asarray(st0.counts).sum(), "no token was revived"
    assert float(st0.computed_fraction()) < float(st.computed_fraction()) <= 1.0
    assert np.isfinite(np.asarray(lp)).all()
