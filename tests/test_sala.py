"""lizard_jax.sala and its tools: training-free sparse prefill (`sparse_teacher`, eval.py --sparse-prefill), the
measured layer choice (`choose_layers`, the `select` CLI on a tiny saved teacher), bad input, and SALA
checkpoints in eval.py speed / passkey."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lizard_jax
from lizard_jax import checkpoint
from lizard_jax.config import ConfigError, load_yaml
from lizard_jax.layers.lightning import LightningSpec
from lizard_jax.layers.softmax import SoftmaxSpec
from lizard_jax.layers.sparse import SparseSpec
from lizard_jax.models import Transformer, abstract_params, init_caches, init_params
from lizard_jax.numerics import FORMS_RTOL, rel_err
from lizard_jax.recipes import student_config, student_params
from lizard_jax.sala import (BEGIN, END, _split_text, check_teacher, choose_layers, hybrid_attention, main,
                             num_sparse, recipe_attention, recipe_specs, sparse_teacher)
from lizard_jax.testing import char_tokenizer, cli_error, save_tiny_teacher, tiny_config
from lizard_jax.textio import read_text
from lizard_jax.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "data" / "tinyshakespeare" / "input.txt.xz"
# small InfLLM-V2 settings: blocks of 16, 1 initial + 1 local block + the best 2 others
SMALL = dict(block_size=16, topk=2, kernel=8, stride=4, init_blocks=1, local_window=16)
HYBRID = {"default": {"kind": "lightning", "chunk_size": 8},
          "layers": {0: {"kind": "sparse", **SMALL, "dense_below": 32}, -1: {"kind": "sparse", **SMALL}}}
SPARSE_OPTIONS = [x for k, v in {**SMALL, "dense_below": 0}.items() for x in ("--sparse-option", f"{k}={v}")]


def eval_cli(capsys, *argv) -> dict:
    """eval.py's main in this process -> its JSON result (the last stdout line)."""
    import eval as eval_py

    capsys.readouterr()
    assert eval_py.main([str(a) for a in argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# Training-free sparse prefill


def test_sparse_teacher_is_the_teacher_below_the_threshold():
    """Full softmax layers become InfLLM-V2 with the teacher's parameters; sliding-window layers stay. Below
    dense_below the logits are the teacher's bit for bit (no cache) and within float32 summation order through
    the cache (prefill + a decoded token); above it the model is really sparse."""
    cfg = tiny_config(attention=(SoftmaxSpec(), SoftmaxSpec(window=8)))
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    sp = sparse_teacher(cfg, **SMALL, dense_below=128)
    assert sp.kinds == ("sparse", "softmax") and sp.attention[1] == cfg.attention[1]
    s = sp.attention[0]
    assert (s.rope, s.qk_norm, s.output_gate, s.dense_below, s.block_size) == (True, False, False, 128, 16)
    assert sparse_teacher(cfg).attention[0].infllm.dense_below == 8192  # the paper's settings by default
    tokens = jax.random.randint(jax.random.key(1), (2, 96), 0, cfg.vocab_size)
    run = lambda c, *a: jax.jit(Transformer(c).apply)({"params": params}, *a)
    want = run(cfg, tokens)
    np.testing.assert_array_equal(np.asarray(run(sp, tokens)), np.asarray(want))
    pos = jnp.broadcast_to(jnp.arange(96, dtype=jnp.int32), (2, 96))
    step = jax.jit(lambda tok, p, c: Transformer(sp).apply({"params": params}, tok, p, c))
    outs, caches = [], init_caches(sp, 2, 96)  # shorter than dense_below: the cache's dense path only
    for a, b in ((0, 95), (95, 96)):
        logits, caches = step(tokens[:, a:b], pos[:, a:b], caches)
        outs.append(logits)
    assert rel_err(jnp.concatenate(outs, axis=1), want) <= FORMS_RTOL
    assert rel_err(run(sparse_teacher(cfg, **SMALL, dense_below=0), tokens), want) > 1e-3  # 6 blocks, 4 kept


def test_sparse_teacher_token_selection():
    """sparse_teacher(selection="token") (the paper's granularity): the config travels with a checkpoint; in the
    sparse regime the model's prefill == token-by-token decoding through the cache; the training path (no cache)
    differentiates."""
    cfg = tiny_config(attention=(SoftmaxSpec(), SoftmaxSpec(window=8)))
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    sp = sparse_teacher(cfg, **SMALL, dense_below=0, selection="token")
    assert sp.attention[0].selection == "token" and sparse_teacher(cfg).attention[0].selection == "block"
    assert sparse_teacher(cfg).attention[0].impl == "auto" and sparse_teacher(cfg, impl="xla").attention[0].impl == "xla"
    with pytest.raises(ConfigError, match="impl must be"):
        sparse_teacher(cfg, impl="cuda")
    assert type(sp).from_dict(sp.to_dict()) == sp
    t = 70
    tokens = jax.random.randint(jax.random.key(2), (2, t), 0, cfg.vocab_size)
    want = jax.jit(Transformer(sp).apply)({"params": params}, tokens)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    step = jax.jit(lambda tok, p, c: Transformer(sp).apply({"params": params}, tok, p, c))
    outs, caches = [], init_caches(sp, 2, 80)
    for i in range(t):
        logits, caches = step(tokens[:, i:i + 1], pos[:, i:i + 1], caches)
        outs.append(logits)
    assert rel_err(jnp.concatenate(outs, axis=1), want) <= FORMS_RTOL
    g = jax.jit(jax.grad(lambda p: Transformer(sp).apply({"params": p}, tokens).astype(jnp.float32).mean()))(params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


# ----------------------------------------------------------------------------------------------------------
# The layer choice


def test_choose_layers_keeps_first_and_last_then_the_highest_scores():
    scores = [0.0, 5.0, 3.0, 0.2, 4.0, 4.0, 1.0, 0.1]
    assert num_sparse(8, 0.5) == 4 and num_sparse(30, 0.25) == 8 and num_sparse(32, 0.25) == 8
    assert choose_layers(scores, 0.5) == (0, 1, 4, 7)  # 4 and 5 tie: the lower index
    assert choose_layers(scores, 0.25) == (0, 7)  # 8 x 0.25 = 2: only the kept ones
    assert choose_layers(scores, 0.5, keep=()) == (1, 2, 4, 5)
    assert choose_layers(scores, 0.6, keep=(-1,)) == (1, 2, 4, 5, 7)  # 4.8 -> 5
    section = hybrid_attention(8, (0, -1), LightningSpec(), SparseSpec())
    cfg = student_config(tiny_config(num_layers=8), section)
    assert cfg.kinds == ("sparse",) + ("lightning",) * 6 + ("sparse",)


def test_bad_input_gives_one_clear_error_each():
    with pytest.raises(ConfigError, match="leaves no sparse layer"):
        num_sparse(30, 0.01, keep=())
    with pytest.raises(ConfigError, match=r"ratio must be in \(0, 1\)"):
        num_sparse(30, 0.0)
    with pytest.raises(ConfigError, match="leave no Lightning layer"):
        num_sparse(4, 0.9)
    with pytest.raises(ConfigError, match="layer index 30 is out of range for 30 layers"):
        choose_layers([0.0] * 30, keep=(0, 30))
    with pytest.raises(ConfigError, match="layer index -9 is out of range"):
        hybrid_attention(8, (0, -9), LightningSpec(), SparseSpec())
    with pytest.raises(ConfigError, match="layer 4 out of range for 4 layers"):
        student_config(tiny_config(num_layers=4), {"default": "lightning", "layers": {4: "sparse"}})
    with pytest.raises(ConfigError, match="needs a lightning and a sparse spec"):
        recipe_specs({"default": "lightning"})
    # a teacher without the projections the converted layers need
    teacher_cfg = tiny_config(num_layers=2)
    params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), nn.unbox(abstract_params(teacher_cfg)))
    del params["layers_1"]["attn"]["k_proj"]
    with pytest.raises(ConfigError, match=r"lacks 1 attention projection.*layers_1/attn/k_proj/kernel"):
        student_params(student_config(teacher_cfg, HYBRID), params, jax.random.key(1))
    # a teacher whose layers are not softmax: no layer choice, no sparse prefill
    linear = tiny_config(attention=(SoftmaxSpec(), LightningSpec()))
    with pytest.raises(ConfigError, match="layer 1 is lightning, not a full softmax layer"):
        check_teacher(linear)
    with pytest.raises(ConfigError, match="no full-causal softmax layer"):
        sparse_teacher(tiny_config(attention=(LightningSpec(), SoftmaxSpec(window=4))))
    with pytest.raises(ConfigError, match="unknown InfLLM-V2 option"):
        sparse_teacher(tiny_config(), top_k=3)


@pytest.fixture(scope="module")
def tiny_select(tmp_path_factory):
    """A tiny saved teacher (4 layers), training text and a copy of configs/sala_smollm2.yaml; `run(tag, steps)`
    runs `python -m lizard_jax.sala select` on them (updating the copy) and returns the result JSON."""
    d = tmp_path_factory.mktemp("select")
    tcfg = save_tiny_teacher(d / "teacher", num_layers=4)
    (d / "text.txt").write_text(read_text(TEXT)[:40000])
    shutil.copyfile(ROOT / "configs" / "sala_smollm2.yaml", d / "sala.yaml")

    def run(tag: str, steps: int) -> dict:
        out = d / f"scores_{tag}.json"
        main(["select", "--teacher", str(d / "teacher"), "--recipe", str(d / "sala.yaml"), "--text",
              str(d / "text.txt"), "--steps", str(steps), "--seq-len", "32", "--batch-size", "4", "--eval-tokens", "256",
              "--ratio", "0.75", "--lr", "3e-2", "--seed", "3", "--out", str(out), "--run-dir", str(d / f"run_{tag}"),
              "--update-config", str(d / "sala.yaml")])
        assert not out.with_suffix(".yaml").exists()  # the section went into the config
        return json.loads(out.read_text())

    return d, tcfg, run


def test_select_cli_writes_scores_and_config(tiny_select):
    """The select CLI on a tiny saved teacher (no transfer steps, to stay quick: test_train covers the training):
    the JSON and the config block are written, the choice follows the scores, and a score is the loss rise of
    the model with exactly that layer linearized (checked against a plain forward of such a model, built from
    the exported student's layer)."""
    d, tcfg, run = tiny_select
    before = (d / "sala.yaml").read_text().splitlines()
    a = run("a", steps=0)
    scores = [a["scores"][str(i)] for i in range(4)]
    assert a["sparse_layers"] == list(choose_layers(scores, 0.75)) and len(a["sparse_layers"]) == 3
    assert {0, 3} <= set(a["sparse_layers"]) and all(np.isfinite(scores))

    # the config: only the marked block changed, and it parses as a train config with the measured recipe
    after = (d / "sala.yaml").read_text().splitlines()
    b0, e0 = [i for i, l in enumerate(before) if BEGIN in l][0], [i for i, l in enumerate(before) if END in l][0]
    b1, e1 = [i for i, l in enumerate(after) if BEGIN in l][0], [i for i, l in enumerate(after) if END in l][0]
    assert after[: b1 + 1] == before[: b0 + 1] and after[e1:] == before[e0:]
    assert any("MEASURED by: python -m lizard_jax.sala select" in l for l in after[b1:e1])
    data = load_yaml(d / "sala.yaml")
    TrainConfig.from_dict({**data, "teacher": str(d / "teacher")})
    kinds = student_config(tcfg, recipe_attention(data)).kinds
    assert [i for i, k in enumerate(kinds) if k == "sparse"] == a["sparse_layers"]

    # one score recomputed independently: the teacher with layer i taken from the transferred student
    i = 1
    _, t_params, tok = lizard_jax.load(d / "teacher")
    _, s_params, _ = lizard_jax.load(d / "run_a" / "transfer" / "student")
    mixed = {**t_params, f"layers_{i}": s_params[f"layers_{i}"]}
    mixed_cfg = student_config(tcfg, {"layers": {i: a["attention"]["default"]}})
    _, held_out = _split_text((d / "text.txt").read_text(), 0.1)
    ids = np.asarray(tok(held_out, add_special_tokens=False)["input_ids"], np.int32)
    win = jnp.asarray(ids[: 8 * 33].reshape(8, 33))
    assert a["eval_tokens"] == 8 * 32

    def ce(cfg, params):
        logits = jax.jit(Transformer(cfg).apply)({"params": params}, win[:, :-1])
        return -float(jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), win[:, 1:, None], axis=-1)))

    np.testing.assert_allclose(ce(tcfg, t_params), a["teacher_loss"], rtol=1e-5)
    np.testing.assert_allclose(ce(mixed_cfg, mixed) - a["teacher_loss"], scores[i], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_select_is_deterministic_for_a_fixed_seed(tiny_select):
    """Two runs with 4 transfer steps and the same seed: the same scores (bit for bit) and the same choice."""
    _, _, run = tiny_select
    a, b = run("x", steps=4), run("y", steps=4)
    assert a["scores"] == b["scores"] and a["sparse_layers"] == b["sparse_layers"]


# ----------------------------------------------------------------------------------------------------------
# eval.py


def test_eval_perplexity_sparse_prefill(tmp_path, capsys):
    """perplexity --sparse-prefill: the teacher exactly below the threshold, different above it; a model with no
    full softmax layer is a clear error."""
    teacher = tmp_path / "teacher"
    save_tiny_teacher(teacher, num_layers=2)
    text = tmp_path / "text.txt"
    text.write_text(read_text(TEXT)[:20000])
    ppl = lambda *extra: eval_cli(capsys, "perplexity", "--checkpoint", teacher, "--text", text, "--seq-len", 96,
                                  "--max-tokens", 384, *extra)
    base = ppl()
    same = ppl("--sparse-prefill")
    assert same["perplexity"] == base["perplexity"] and same["sparse_prefill"]["dense_below"] == 8192
    sparse = ppl("--sparse-prefill", *SPARSE_OPTIONS)
    assert sparse["sparse_prefill"]["dense_below"] == 0 and abs(sparse["nll"] - base["nll"]) > 1e-4
    import eval as eval_py

    args = ["perplexity", "--checkpoint", teacher, "--text", text, "--seq-len", 96, "--max-tokens", 384]
    cli_error(capsys, eval_py.main, [*args, "--sparse-option", "topk=4"], "needs --sparse-prefill")
    cli_error(capsys, eval_py.main, [*args, "--sparse-prefill", "--sparse-option", "top_k=4"],
              "unknown InfLLM-V2 option")
    cli_error(capsys, eval_py.main, [*args, "--sparse-prefill", "--sparse-option", "selection=tokens"], "selection")
    cli_error(capsys, eval_py.main, [*args, "--sparse-prefill", "--sparse-option", "topk=all"], "expected an integer")
    assert eval_py._sparse_option("selection=token") == ("selection", "token")
    assert eval_py._sparse_option("impl=xla") == ("impl", "xla")
    cli_error(capsys, eval_py.main, [*args, "--sparse-prefill", "--sparse-option", "impl=cuda"], "impl must be")


@pytest.mark.slow
def test_eval_speed_and_passkey_take_sala_checkpoints(tmp_path, capsys):
    """speed measures a SALA checkpoint beside a teacher's sparse prefill (--sparse-prefill DIR); passkey runs
    on a SALA checkpoint."""
    teacher = tmp_path / "teacher"
    tcfg = save_tiny_teacher(teacher, num_layers=4)
    text = tmp_path / "text.txt"
    text.write_text(read_text(TEXT)[:20000])
    sala = tmp_path / "sala"
    cfg = student_config(tcfg, HYBRID)
    _, t_params, _ = lizard_jax.load(teacher)
    checkpoint.save(sala, cfg, student_params(cfg, t_params, jax.random.key(0)), char_tokenizer(tcfg.vocab_size))
    out = eval_cli(capsys, "speed", "--checkpoint", f"sala={sala}", "--sparse-prefill", teacher, "--contexts", 64,
                   "--decode-tokens", 2, "--warmup", 0, "--reps", 1, *SPARSE_OPTIONS)
    assert set(out["models"]) == {"sala", "teacher-sparse"}
    assert out["models"]["teacher-sparse"]["path"] == str(teacher)
    assert out["models"]["teacher-sparse"]["sparse_prefill"]["block_size"] == 16
    rows = {k: m["rows"][0] for k, m in out["models"].items()}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["sala"]["cache_bytes"] < rows["teacher-sparse"]["cache_bytes"]  # 2 of 4 layers keep KV
    out = eval_cli(capsys, "passkey", "--checkpoint", sala, "--text", text, "--lengths", 300, "--depths", 0.5)
    (trial,) = out["trials"]
    # an untrained hybrid cannot recall a random 5-digit key
    assert out["task"] == "passkey" and out["accuracy"] == 0.0 and not trial["correct"]
    assert str(trial["key"]) not in trial["answer"]
    import eval as eval_py

    cli_error(capsys, eval_py.main, ["passkey", "--checkpoint", sala, "--text", text, "--lengths", 300,
                                     "--sparse-prefill"], "no full-causal softmax layer")


def test_select_compare_rank_correlation(tmp_path, capsys):
    from lizard_jax.sala import main

    def result(scores, chosen):
        return {"num_layers": len(scores), "keep": [0, len(scores) - 1], "sparse_layers": chosen,
                "scores": {str(i): s for i, s in enumerate(scores)}, "command": "select"}

    a = result([5.0, 0.4, 0.3, 0.2, 0.1, 1.0], [0, 1, 5])
    same = result([9.0, 0.8, 0.6, 0.4, 0.2, 0.0], [0, 1, 5])  # other values, same order except the kept last
    rev = result([5.0, 0.1, 0.2, 0.3, 0.4, 1.0], [0, 4, 5])
    tie = result([5.0, 0.3, 0.3, 0.2, 0.1, 1.0], [0, 1, 5])
    paths = []
    for name, r in (("a", a), ("same", same), ("rev", rev), ("tie", tie)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(r))
    assert main(["compare", *map(str, paths)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    pairs = {(p["a"], p["b"]): p for p in out["pairs"]}
    assert pairs[(0, 1)]["spearman_free"] == pytest.approx(1.0)
    assert pairs[(0, 1)]["spearman"] == pytest.approx(1 - 6 * 20 / (6 * 35))  # sum of squared rank shifts 20
    assert pairs[(0, 2)]["spearman_free"] == pytest.approx(-1.0)
    assert pairs[(0, 2)]["chosen_common"] == [0, 5]
    # ties share their mean rank: free ranks (3, 2, 1, 0) vs (2.5, 2.5, 1, 0)
    assert pairs[(0, 3)]["spearman_free"] == pytest.approx(np.corrcoef([3, 2, 1, 0], [2.5, 2.5, 1, 0])[0, 1])
    assert main(["compare", str(paths[0])]) == 2
    assert "at least two" in capsys.readouterr().err
