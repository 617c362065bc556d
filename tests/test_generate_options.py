"""`lizard_jax.generate`'s context-parallel and lazy-prefill options, and `eval.py passkey` with them: each option
routes to its implementation and equals the plain path token for token where it must (Star with one block
covering the context, keep fraction 1.0), the option errors, and eval.py smoke runs on a tiny saved teacher
(simulated CPU devices from tests/conftest.py; the Star run in a fresh process that sets its own device count).
Ring attention and pruning that changes the output are tested in test_distributed.py / test_lazy.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lizard_jax.distributed
import lizard_jax.lazy
from lizard_jax import ModelConfig, checkpoint
from lizard_jax.generate import generate
from lizard_jax.lazy import LazyConfig
from lizard_jax.models import Transformer, init_params
from lizard_jax.sharding import make_mesh
from lizard_jax.testing import char_tokenizer, cli_error

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # eval.py, the entry point, lives at the repo root

import eval as eval_cli  # noqa: E402

CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, ffn_dim=64,
                  eos_token_ids=(1,))
NEW = 10


def mesh_of(n: int, axis: str = "context"):
    return make_mesh({axis: n}, devices=jax.devices()[:n])


@pytest.fixture(scope="module")
def model_params():
    """A tiny GQA model with scaled-up q/k projections: attention is sharp, so which keys a query sees (blocks,
    pruning) changes the continuation and the equalities below are not vacuous."""
    params = init_params(CFG, jax.random.key(0))
    sharpen = lambda path, x: x * 12.0 if any(getattr(p, "key", None) in ("q_proj", "k_proj") for p in path) else x
    return Transformer(CFG), jax.tree_util.tree_map_with_path(sharpen, params)


@pytest.fixture(scope="module")
def plain(model_params):
    model, params = model_params
    rng = np.random.default_rng(0)
    ids = [list(map(int, rng.integers(1, CFG.vocab_size, n))) for n in (70, 41)]
    ref = generate(model, params, ids, max_new_tokens=NEW, stop_at_eos=False)
    assert all(len(set(t)) > 2 for t in ref.tokens)  # non-degenerate continuations
    return ids, ref.tokens


def spy(monkeypatch, module, name: str) -> list[dict]:
    """Record the keyword arguments of every call of `module.name` (generate calls it through its module)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


def test_star_one_block_equals_plain_generate(model_params, plain, monkeypatch):
    """Star on 4 devices with one block covering the context == plain generate, token for token."""
    model, params = model_params
    ids, ref = plain
    calls = spy(monkeypatch, lizard_jax.distributed, "generate_context_parallel")
    out = generate(model, params, ids, max_new_tokens=NEW, stop_at_eos=False, context_parallel="star",
                   mesh=mesh_of(4), block_size=64)
    assert out.tokens == ref
    assert [(c["mode"], c["block_size"], c["anchor"]) for c in calls] == [("star", 64, "first")]


def test_query_star_one_block_equals_plain_generate(model_params, plain, monkeypatch):
    """generate(..., query=): Star with one block, the query (longer than query_size on one row) in phase 2 ==
    plain generate of prompt + query; without context parallelism the query simply follows the prompt."""
    model, params = model_params
    ids, ref = plain
    split = [(60, 10), (3, 38)]  # prompt 70 = 60 + 10, prompt 41 = 3 + 38
    prompts, queries = [p[:c] for p, (c, _) in zip(ids, split)], [p[c:] for p, (c, _) in zip(ids, split)]
    calls = spy(monkeypatch, lizard_jax.distributed, "generate_context_parallel")
    out = generate(model, params, prompts, query=queries, max_new_tokens=NEW, stop_at_eos=False,
                   context_parallel="star", mesh=mesh_of(4), block_size=64)
    assert out.tokens == ref
    assert out.prompt_lengths == [60, 3]
    q_pos = np.asarray(calls[0]["query_positions"])
    assert [sorted(r[r >= 0].tolist()) for r in q_pos] == [list(range(60, 70)), list(range(3, 41))]
    assert generate(model, params, prompts, query=np.asarray([[5, 6], [7, 8]]), max_new_tokens=2,
                    stop_at_eos=False).tokens == generate(model, params, [p + q for p, q in zip(prompts, [[5, 6], [7, 8]])],
                                                          max_new_tokens=2, stop_at_eos=False).tokens


@pytest.mark.parametrize("query,match", [
    ([[5]], "query has 1 entries for 2 prompts"),
    ([[5], []], "query 1 is empty"),
    ([[5], [1.5]], "query 1 must hold integer token ids"),
    ([[5], 7], "query 1 must be a string or a sequence of token ids"),
    ("what?", "one question per prompt, got a single string"),
    (np.ones((2, 3), np.float32), "integer token ids"),
    ([["a"], [5]], "query 0 must hold integer token ids"),
], ids=["count", "empty", "float", "scalar", "string", "float-array", "str-ids"])
def test_bad_query(model_params, query, match):
    model, params = model_params
    with pytest.raises(ValueError, match=match):
        generate(model, params, [[5, 6, 7], [8, 9]], query=query, max_new_tokens=2, context_parallel="star",
                 mesh=mesh_of(2))


def test_query_with_chat_is_an_error(model_params):
    model, params = model_params
    with pytest.raises(ValueError, match="cannot be combined with chat=True"):
        generate(model, params, ["abc"], query=["d"], tokenizer=char_tokenizer(CFG.vocab_size), chat=True)


def test_lazy_keep_one_equals_plain_generate(model_params, plain, monkeypatch):
    model, params = model_params
    ids, ref = plain
    calls = spy(monkeypatch, lizard_jax.lazy, "generate_lazy")
    lazy = LazyConfig(layers=(0,), keep=(1.0,))
    out = generate(model, params, ids, max_new_tokens=NEW, stop_at_eos=False, prefill="lazy", lazy=lazy)
    assert out.tokens == ref
    assert [c["lazy"] for c in calls] == [lazy]


@pytest.mark.parametrize("kwargs,match", [
    (dict(context_parallel="star"), "needs a mesh with a 'context' axis"),
    (dict(context_parallel="star", mesh="data"), "needs a mesh with a 'context' axis"),
    (dict(context_parallel="ulysses", mesh="context"), "context_parallel must be one of"),
    (dict(context_parallel="star", mesh="context", block_size=64, anchor_size=128), "larger than a block"),
    (dict(block_size=64), "block_size given without context_parallel"),
    (dict(mesh="context"), "mesh given without context_parallel"),
    (dict(anchor="none"), "anchor given without context_parallel"),
    (dict(prefill="eager"), "prefill must be one of"),
    (dict(lazy=LazyConfig(layers=(0,), keep=(0.5,))), "needs prefill='lazy'"),
    (dict(prefill="lazy", context_parallel="star", mesh="context"), "cannot be combined with context_parallel"),
    (dict(prefill="lazy", lazy=LazyConfig(layers=(1,), keep=(0.5,))), "out of range"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_bad_options(model_params, kwargs, match):
    model, params = model_params
    kwargs = dict(kwargs)
    if "mesh" in kwargs:
        kwargs["mesh"] = mesh_of(2, kwargs["mesh"])
    with pytest.raises(ValueError, match=match):
        generate(model, params, [[5, 6, 7]], max_new_tokens=2, **kwargs)


# ---------------------------------------------------------------------------------------------- eval.py


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, model_params):
    """eval.py passkey arguments: the tiny sharp model saved with a character tokenizer (as
    `testing.save_tiny_teacher`, without a second init), filler text, two depths."""
    root = tmp_path_factory.mktemp("passkey")
    checkpoint.save(root / "teacher", CFG, model_params[1], char_tokenizer(CFG.vocab_size))
    text = root / "filler.txt"
    text.write_text("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 20)
    args = ["passkey", "--checkpoint", root / "teacher", "--text", text, "--lengths", "320", "--depths", "0,1"]
    return [str(x) for x in args]


def passkey_json(capsys, args) -> dict:
    assert eval_cli.main(args) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def answers(out: dict) -> list[str]:
    return [t["answer"] for t in out["trials"]]


def test_eval_passkey_star_and_lazy(teacher, capsys):
    """Star on 2 simulated devices (a fresh process: eval.py sets XLA_FLAGS itself) with the context in one block
    and the question as the query, and lazy prefill with keep 1.0 (paper decoding): both are exact, so they give
    the same answers."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), *teacher, "--context-parallel", "star",
                        "--devices", "2", "--block-size", "512"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    star = json.loads(p.stdout.strip().splitlines()[-1])
    assert star["generation"] == dict(context_parallel="star", block_size=512, anchor_size=None, anchor="first",
                                      devices=2, query="question")
    lazy = passkey_json(capsys, teacher + ["--prefill", "lazy", "--lazy-layers", "0", "--lazy-keep", "1",
                                           "--lazy-decode", "paper"])
    assert lazy["generation"] == {"prefill": "lazy",
                                  "lazy": repr(LazyConfig(layers=(0,), keep=(1.0,), decode="paper"))}
    assert len(answers(star)) == 2 and answers(star) == answers(lazy)


@pytest.mark.parametrize("extra,match", [
    (["--block-size", "64"], r"--block-size need\(s\) --context-parallel"),
    (["--multihost"], r"--multihost need\(s\) --context-parallel"),
    (["--lazy-keep", "0.5"], r"--lazy-keep need\(s\) --prefill lazy"),
    (["--lazy-decode", "paper"], r"--lazy-decode need\(s\) --prefill lazy"),
    (["--query", "last"], r"--query need\(s\) --context-parallel"),
    (["--prefill", "lazy", "--context-parallel", "star"], "cannot be combined"),
    (["--context-parallel", "star", "--devices", "64"], "jax sees 8 cpu device"),
    (["--context-parallel", "star", "--block-size", "64", "--anchor-size", "128"], "larger than a block"),
    (["--prefill", "lazy", "--lazy-keep", "0.5"], "need --lazy-layers"),
    (["--prefill", "lazy", "--lazy-layers", "1", "--lazy-keep", "0.5"], "out of range"),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_eval_passkey_bad_flags(teacher, capsys, extra, match):
    cli_error(capsys, eval_cli.main, teacher + extra, match)


@pytest.mark.slow
def test_eval_passkey_multihost(teacher, capsys):
    """`--multihost` with two local processes of 2 CPU devices each (a SLURM-like environment, gloo collectives):
    one 4-device context mesh spans both processes; both print the plain run's answers."""
    import socket

    ref = passkey_json(capsys, teacher)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = os.environ | dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                            SLURM_STEP_NUM_NODES="1", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                            JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_PLATFORMS="cpu",
                            XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, str(ROOT / "eval.py"), *teacher, "--context-parallel", "star", "--devices", "4",
           "--block-size", "256", "--multihost"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env | {"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [r["generation"]["devices"] for r in results] == [4, 4]
    assert answers(results[0]) == answers(results[1]) == answers(ref)
