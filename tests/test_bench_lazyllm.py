"""benchmarks/bench_lazyllm.py's passkey prompts and its key-rank table: the digit spans are the key's copies, and
the rank is the pruning budget below which LazyLLM's prefill (the masked spec) drops every whole copy of the key."""

import jax
import numpy as np

from benchmarks import bench_lazyllm as bench
from lizard_jax.config import ModelConfig
from lizard_jax.lazy import LazyConfig, prefill_reference
from lizard_jax.models import Transformer, init_params

FILLER = [ord(c) for c in "the quick brown fox jumps over the lazy dog. " * 40]


class CharTokenizer:
    """One token per character (id = code point): enough for the prompt builder."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)


def test_passkey_cases_locate_both_copies_of_the_key():
    tok = CharTokenizer()
    cases = bench.passkey_cases(tok, FILLER, 600, trials=2)
    assert len(cases) == 10 and len({key for _, key, _ in cases}) == 10
    for prompt, key, copies in cases:
        assert len(prompt) == 600
        assert [tok.decode(prompt[s:e]) for s, e in copies] == [str(key)] * 2
    assert cases == bench.passkey_cases(tok, FILLER, 600, trials=2), "not reproducible"


def test_rank_is_the_budget_that_keeps_the_key():
    cfg = ModelConfig(vocab_size=128, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, ffn_dim=64,
                      eos_token_ids=(1,), dtype="float32")
    model, params = Transformer(cfg), init_params(cfg, jax.random.key(0))
    cases = bench.passkey_cases(CharTokenizer(), FILLER, 400, trials=1)
    ranks = bench.needle_ranks(model, params, cases, batch=2)
    assert ranks.shape == (3, 5) and ((ranks >= 0) & (ranks < 1)).all()
    pos = np.arange(400, dtype=np.int32)[None]
    for layer in (0, 1):
        for n, (prompt, _, copies) in enumerate(cases):
            above = round(ranks[layer, n] * 399)  # prompt tokens but the last scored above the key
            for budget, kept in ((above + 2, True), (above + 1, False)):  # + the last token (+ the key's own digit)
                ref = prefill_reference(model, params, np.asarray([prompt], np.int32), pos,
                                        LazyConfig(layers=(layer,), top_k=(budget,)))
                active = np.asarray(ref["active"][layer + 1, 0])
                assert any(active[s:e].all() for s, e in copies) == kept, (layer, n, budget)
