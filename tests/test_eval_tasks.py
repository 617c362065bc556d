"""eval.py tasks mqar and speed: prompt/answer alignment, exactness of the batched scoring, the speed programs
against generate, and both tasks end to end through eval.py on a tiny random checkpoint with a tiny offline
word-level tokenizer."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lizard_jax
from lizard_jax import checkpoint
from lizard_jax.eval import mqar as mq
from lizard_jax.eval import speed as sp
from lizard_jax.models import Transformer, init_caches, init_params
from lizard_jax.numerics import assert_close
from lizard_jax.testing import cli_error, tiny_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # eval.py, the entry point, lives at the repo root

import eval as eval_cli  # noqa: E402
WORDS = ("apple banana cherry dragon eagle falcon garden harbor island jungle kettle lemon mango needle ocean "
         "pepper quartz river salmon tiger umbrella violet walnut yellow zebra anchor basket candle desert "
         "engine forest glacier hammer insect jacket ladder marble napkin orange parrot rocket saddle").split()
TEMPLATE_WORDS = "remember the value of each key in this list now recall values".split()


def word_tokenizer():
    """A word-level tokenizer built offline: specials, template words, punctuation, then the word pool."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["[UNK]", "[EOS]", *TEMPLATE_WORDS, ":", ",", ".", "ab", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    cfg = tiny_config()
    assert len(tok) <= cfg.vocab_size
    params = init_params(cfg, jax.random.key(0))
    path = tmp_path_factory.mktemp("eval") / "teacher"
    checkpoint.save(path, cfg, params, tok)
    return cfg, params, path


def run_eval(*args) -> tuple[int, dict | None, str]:
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], capture_output=True, text=True,
                       cwd=ROOT)
    lines = p.stdout.strip().splitlines()
    return p.returncode, json.loads(lines[-1]) if p.returncode == 0 else None, p.stderr


# ----------------------------------------------------------------------------------------------------------
# mqar


def copy_oracle(sep_len: int):
    """A perfect copier: the value after the first occurrence of each query's key."""
    def predict(tokens, at):
        out = np.zeros(at.shape, np.int32)
        for b in range(tokens.shape[0]):
            for j, a in enumerate(at[b]):
                key = tokens[b, a - sep_len]
                first = np.flatnonzero(tokens[b] == key)[0]
                out[b, j] = tokens[b, first + sep_len + 1]
        return out
    return predict


def test_token_pool_single_tokens_disjoint_without_template(tok):
    ids = mq.TemplateIds.encode(tok)
    exclude = ids.intro + ids.sep + ids.delim + ids.bridge
    keys, values = mq.token_pool(tok, exclude=exclude)
    assert set(keys).isdisjoint(values) and len(keys) + len(values) == len(WORDS)  # "ab" is too short
    for i in [*keys, *values]:
        assert tok(tok.decode([int(i)]), add_special_tokens=False)["input_ids"] == [i]
        assert i not in exclude
    with pytest.raises(ValueError, match="single-token words"):
        mq.token_pool(tok, exclude=range(len(tok)))


@pytest.mark.parametrize("pairs,queries", [(1, 1), (5, 3), (20, 20)], ids=lambda x: str(x))
def test_prompt_layout(tok, pairs, queries):
    ids = mq.TemplateIds.encode(tok)
    keys, values = mq.token_pool(tok, exclude=ids.intro + ids.sep + ids.delim + ids.bridge)
    tokens, at, answers = mq.build_prompt(np.random.default_rng(pairs), ids, keys, values, pairs, queries)
    assert len(tokens) == ids.prompt_length(pairs, queries) and at[-1] == len(tokens) - 1
    start = len(ids.intro)
    k = tokens[start::len(ids.sep) + len(ids.delim) + 2][:pairs]
    v = tokens[start + len(ids.sep) + 1::len(ids.sep) + len(ids.delim) + 2][:pairs]
    assert len(set(k)) == pairs and set(k) <= set(keys) and set(v) <= set(values)
    table = dict(zip(k, v))
    qk = tokens[at - len(ids.sep)]
    assert len(set(qk)) == queries and all(table[a] == b for a, b in zip(qk, answers))
    np.testing.assert_array_equal(tokens[at[:-1] + 1], answers[:-1])  # earlier answers are teacher-forced
    assert tok.decode(tokens).startswith("remember the value of each key in this list . ")


def test_pairs_for_length(tok):
    ids = mq.TemplateIds.encode(tok)
    for length in (60, 61, 97, 200):
        n = ids.pairs_for_length(length, 4)
        assert ids.prompt_length(n, 4) <= length < ids.prompt_length(n + 1, 4)
    with pytest.raises(ValueError, match="fewer than the 4 queries"):
        ids.pairs_for_length(20, 4)


def test_copier_scores_one_and_wrong_scores_zero(tok):
    sep = len(mq.TemplateIds.encode(tok).sep)
    kw = dict(pairs=(4, 12), lengths=(80,), num_queries=5, trials=3, batch_size=2, progress=False)
    out = mq.mqar(None, None, tok, predict=copy_oracle(sep), **kw)
    assert out["accuracy"] == 1.0 and set(out["by_pairs"]) == {"4", "12"} and set(out["by_length"]) == {"80"}
    assert [s["total"] for s in out["settings"]] == [12, 15, 15]  # 4 pairs: min(5, 4) queries
    wrong = lambda tokens, at: copy_oracle(sep)(tokens, at) + 1
    assert mq.mqar(None, None, tok, predict=wrong, **kw)["accuracy"] == 0.0


def test_batched_scoring_equals_greedy_generation(ckpt, tok):
    """One forward pass with teacher-forced earlier answers == a separate greedy generation per query."""
    cfg, params, _ = ckpt
    model = Transformer(cfg)
    ids = mq.TemplateIds.encode(tok)
    keys, values = mq.token_pool(tok, exclude=ids.intro + ids.sep + ids.delim + ids.bridge)
    rng = np.random.default_rng(3)
    rows = [mq.build_prompt(rng, ids, keys, values, 9, 4) for _ in range(2)]
    tokens, at, _ = (np.stack(x) for x in zip(*rows))
    pred = mq.model_predictor(model, params)(tokens, at)
    for b in range(2):
        prompts = [tokens[b, : a + 1].tolist() for a in at[b]]
        gen = lizard_jax.generate(model, params, prompts, max_new_tokens=1, stop_at_eos=False)
        np.testing.assert_array_equal(pred[b], [g[0] for g in gen.tokens])


def test_mqar_end_to_end(ckpt, tok):
    """eval.py mqar scores the saved model exactly as the library does with the same settings; an untrained
    model is no better than chance."""
    cfg, params, path = ckpt
    rc, out, err = run_eval("mqar", "--checkpoint", path, "--pairs", "4", "--lengths", "96", "--queries", "4",
                            "--trials", "3", "--batch-size", "2", "--seed", "5")
    assert rc == 0, err
    ref = mq.mqar(Transformer(cfg), params, tok, pairs=(4,), lengths=(96,), num_queries=4, trials=3,
                  batch_size=2, seed=5, progress=False)
    assert out == {**json.loads(json.dumps(ref)), "checkpoint": str(path)}
    assert set(out["by_pairs"]) == {"4"} and set(out["by_length"]) == {"96"}
    assert out["settings"][-1]["prompt_tokens"] <= 96 and out["pool"] == {"keys": 21, "values": 21}
    assert out["accuracy"] <= 2 * out["chance"]


@pytest.mark.parametrize("args,match", [
    (["--lengths", "20"], "fewer than the 16 queries"),
    (["--queries", "0"], "num_queries must be >= 1"),
    (["--pairs", "0"], "must be positive"),
    (["--pairs", "100"], "key pool has only 21"),
])
def test_mqar_bad_arguments(ckpt, capsys, args, match):
    cli_error(capsys, eval_cli.main, ["mqar", "--checkpoint", str(ckpt[2]), *args], match)


# ----------------------------------------------------------------------------------------------------------
# speed


@pytest.mark.parametrize("with_cache", [False, True], ids=["no-cache", "cache"])
def test_forward_at_equals_full_logits(ckpt, with_cache):
    cfg, params, _ = ckpt
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 37), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(37), (2, 37))
    at = jnp.array([[0, 36, 5], [17, 2, 36]])
    ref = model.apply({"params": params}, tokens)
    if with_cache:
        got, caches = sp.forward_at(model, params, tokens, pos, init_caches(cfg, 2, 40), at=at)
        assert int(caches[0].index) == 37
    else:
        got = sp.forward_at(model, params, tokens, at=at)
    assert_close(got, jnp.take_along_axis(ref, at[..., None], axis=1), dtype=jnp.float32)
    with pytest.raises(ValueError, match="at must be"):
        sp.forward_at(model, params, tokens, at=at[0])


def test_speed_programs_match_generate(ckpt):
    """The timed prefill + decode loop produce the same greedy tokens as lizard_jax.generate."""
    cfg, params, _ = ckpt
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(2), (1, 64), 0, cfg.vocab_size)  # a pad bucket: no padding
    first, last, caches = jax.jit(lambda p, t: sp._prefill(model, p, t, cache_len=70))(params, tokens)
    steps = jax.jit(lambda p, c, l: sp._decode(model, p, c, l, steps=6, last_pos=63))(params, caches, last)
    ref = lizard_jax.generate(model, params, [tokens[0].tolist()], max_new_tokens=6, stop_at_eos=False)
    assert int(first[0]) == ref.tokens[0][0]
    np.testing.assert_array_equal(np.asarray(steps)[0], ref.tokens[0])


def test_measure_reports_oom_as_a_row(ckpt, monkeypatch):
    cfg, params, _ = ckpt
    model = Transformer(cfg)

    def boom(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")

    monkeypatch.setattr(sp, "measure", boom)
    out = sp.speed(model, params, [64, 32], progress=False)
    assert [r["context"] for r in out["rows"]] == [32, 64] and all(r["status"] == "oom" for r in out["rows"])
    assert out["rows"][1]["cache_bytes"] == sp.cache_bytes(cfg, 1, 64)

    def bug(*a, **k):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(sp, "measure", bug)
    with pytest.raises(RuntimeError, match="some other failure"):
        sp.speed(model, params, [32], progress=False)


def test_speed_end_to_end(ckpt, tmp_path, capsys):
    cfg, _, path = ckpt
    lin = tmp_path / "lightning.json"
    tiny_config(attention="lightning").to_json(lin)
    png = tmp_path / "speed.png"
    rc, out, err = run_eval("speed", "--checkpoint", f"teacher={path}", "--random", str(lin), "--contexts", "48,16",
                            "--decode-tokens", "4", "--warmup", "0", "--reps", "1", "--plot", png)
    assert rc == 0, err
    assert out["task"] == "speed" and out["contexts"] == [16, 48] and list(out["models"]) == ["teacher", "lightning"]
    for m in out["models"].values():
        for r in m["rows"]:
            assert r["status"] == "ok" and r["prefill_ms"] > 0 and r["decode_tok_s"] > 0 and r["decode_tokens"] == 4
            assert {"prefill_tok_s", "cache_bytes", "program_bytes", "peak_bytes"} <= set(r)
    soft, flat = ([r["cache_bytes"] for r in out["models"][k]["rows"]] for k in ("teacher", "lightning"))
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 + cfg.num_layers * 4  # k, v; pos
    assert soft[1] - soft[0] == 32 * kv_per_token and flat[0] == flat[1]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"

    # merge saved runs (the last JSON line of each file); a repeated label is refused
    other = {**out, "models": {"other": out["models"]["lightning"]}}
    (tmp_path / "a.json").write_text("progress\n" + json.dumps(out) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(other) + "\n")
    assert eval_cli.main(["speed", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    merged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(merged["models"]) == ["lightning", "other", "teacher"]
    cli_error(capsys, eval_cli.main, ["speed", "--merge", tmp_path / "a.json", tmp_path / "a.json"],
              "repeats model label")


def test_speed_isolated_subprocess(ckpt):
    _, _, path = ckpt
    src = sp.ModelSource.parse("checkpoint", str(path))
    out = sp.speed_sources([src], [32], sp.SpeedOptions(decode_tokens=2, warmup=0, reps=1), isolate=True,
                           progress=False)
    (r,) = out["models"]["teacher"]["rows"]
    assert out["isolate"] and r["status"] == "ok" and r["context"] == 32 and r["decode_tokens"] == 2
    assert out["device"].startswith("cpu") and "device" not in r


@pytest.mark.parametrize("args,match", [
    ([], "give at least one --checkpoint"),
    (["--checkpoint", "/nonexistent/x"], "checkpoint source not found"),
    (["--random", "a=CFG", "--random", "a=CFG"], "labels must be distinct"),
    (["--random", "CFG", "--contexts", "0,16"], "distinct positive integers"),
    (["--random", "CFG", "--decode-tokens", "0"], "decode_tokens must be >= 1"),
    (["--merge", "CFG"], "does not end with an eval.py speed JSON line"),
])
def test_speed_bad_arguments(tmp_path, capsys, args, match):
    cfg = tmp_path / "cfg.json"
    tiny_config().to_json(cfg)
    cli_error(capsys, eval_cli.main, ["speed", *[a.replace("CFG", str(cfg)) for a in args]], match)


def test_speed_bad_context_list_is_an_argparse_error(capsys):
    cli_error(capsys, eval_cli.main, ["speed", "--random", "x", "--contexts", "1k"], "--contexts")
