"""Student adapters: only what a student changed in its teacher; rebuilt on the teacher, refused on another one."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lizard_jax
from lizard_jax import adapter, checkpoint
from lizard_jax.checkpoint import CheckpointError
from lizard_jax.numerics import assert_close
from lizard_jax.recipes import student_config, student_params
from lizard_jax.sharding import make_mesh
from lizard_jax.convert import from_hf_model
from lizard_jax.testing import char_tokenizer, tiny_hf_model
from lizard_jax.lora import init_lora, merge_lora

RECIPE = {"default": {"kind": "lizard", "window": 4, "meta_tokens": 2, "gate_scale_init": 0.5},
          "layers": {1: "softmax"}}
RANK, ALPHA = 4, 8.0


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, toks):
    return model.apply({"params": params}, toks)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny teacher, and a Lizard student of it with random LoRA on layer 0 and a changed norm in layer 1,
    saved whole (the reference) and as (student without LoRA, LoRA factors) for `adapter.save`."""
    d = tmp_path_factory.mktemp("adapter")
    tcfg, tparams = from_hf_model(tiny_hf_model("llama", eos_token_id=1))  # no jax init to compile
    checkpoint.save(d / "teacher", tcfg, tparams, char_tokenizer(tcfg.vocab_size))
    scfg = student_config(tcfg, RECIPE)
    base = jax.jit(lambda tp, k: student_params(scfg, tp, k))(tparams, jax.random.key(1))
    base["layers_1"]["attn_norm"]["scale"] = base["layers_1"]["attn_norm"]["scale"] + 0.25

    @jax.jit  # one program instead of many eager ops
    def with_lora(base):
        lora = init_lora(base, ["q_proj", "v_proj"], RANK, jax.random.key(2), layer_filter=lambda i: i == 0)
        lora = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape), lora)
        return lora, merge_lora(base, lora, ALPHA)

    lora, full = with_lora(base)
    checkpoint.save(d / "student", scfg, full)
    toks = jax.random.randint(jax.random.key(4), (2, 24), 0, tcfg.vocab_size)
    return d, scfg, base, lora, tparams, toks


def test_adapter_from_lora_rebuilds_the_student(pair):
    d, scfg, base, lora, tparams, toks = pair
    tcfg = checkpoint.read_config(d / "teacher")
    adapter.save(d / "a_lora", scfg, base, tcfg, tparams, lora=lora, lora_alpha=ALPHA)
    info = json.loads((d / "a_lora" / "adapter.json").read_text())
    assert set(info["parts"]) == {"new", "lora", "changed"}
    assert info["parts"]["changed"]["tensors"] == 1  # the one changed norm; q/v kernels travel as factors only
    assert info["parts"]["lora"]["tensors"] == 4
    model, params, tok = lizard_jax.load(d / "a_lora", teacher=d / "teacher")
    ref_model, ref, _ = lizard_jax.load(d / "student")
    assert model.cfg == ref_model.cfg and tok is not None and tok.eos_token_id == 1
    assert_close(_logits(model, params, toks), _logits(ref_model, ref, toks), rtol=1e-5)


def test_extract_finds_the_low_rank_deltas_and_merge_writes_the_full_student(pair, tmp_path):
    from lizard_jax.adapter import main

    d, _, _, _, _, toks = pair
    assert main(["extract", str(d / "student"), "--teacher", str(d / "teacher"), "--out", str(tmp_path / "a")]) == 0
    info = json.loads((tmp_path / "a" / "adapter.json").read_text())
    # q and v of layer 0: [64, 64] and [64, 32] kernels recovered as rank-4 factors (SVD of the merged delta)
    assert info["parts"]["lora"] == {"tensors": 4, "values": RANK * (64 + 64) + RANK * (64 + 32)}
    assert adapter.folder_bytes(tmp_path / "a") < 0.5 * adapter.folder_bytes(d / "student")
    assert main(["merge", str(tmp_path / "a"), "--teacher", str(d / "teacher"), "--out", str(tmp_path / "m")]) == 0
    ref_model, ref, _ = lizard_jax.load(d / "student")
    mesh = make_mesh({"data": 2, "tensor": 4})
    for src in ({"ckpt_dir": tmp_path / "a", "teacher": d / "teacher"}, {"ckpt_dir": tmp_path / "m"},
                {"ckpt_dir": tmp_path / "a", "teacher": d / "teacher", "mesh": mesh}):
        model, params, _ = lizard_jax.load(**src)
        assert_close(_logits(model, params, toks), _logits(ref_model, ref, toks), rtol=1e-5)
    assert params["layers_0"]["attn"]["q_proj"]["kernel"].sharding.spec[1] == "tensor"  # placed by the rules


def test_wrong_or_missing_teacher_is_refused(pair, tmp_path):
    d = pair[0]
    adapter.extract(d / "student", d / "teacher", tmp_path / "a")
    _, tparams, tok = lizard_jax.load(d / "teacher")
    tcfg = checkpoint.read_config(d / "teacher")
    other = jax.tree_util.tree_map(lambda x: x, tparams)
    other["layers_0"]["mlp_norm"]["scale"] = other["layers_0"]["mlp_norm"]["scale"].at[3].add(1e-6)
    checkpoint.save(tmp_path / "other_weights", tcfg, other, tok)
    narrow = jax.tree_util.tree_map(lambda x: x, tparams)
    for i in range(tcfg.num_layers):
        m = narrow[f"layers_{i}"]["mlp"]
        m["gate_proj"]["kernel"], m["up_proj"]["kernel"] = m["gate_proj"]["kernel"][:, :64], m["up_proj"]["kernel"][:, :64]
        m["down_proj"]["kernel"] = m["down_proj"]["kernel"][:64]
    checkpoint.save(tmp_path / "other_shapes", tcfg.replace(ffn_dim=64), narrow, tok)
    with pytest.raises(CheckpointError, match="other weights.*SHA-256"):
        lizard_jax.load(tmp_path / "a", teacher=tmp_path / "other_weights")
    with pytest.raises(CheckpointError, match="shapes.*mlp"):
        lizard_jax.load(tmp_path / "a", teacher=tmp_path / "other_shapes")
    with pytest.raises(CheckpointError, match="adapter.*pass the teacher"):
        lizard_jax.load(tmp_path / "a")
    with pytest.raises(CheckpointError, match="adapter, not a full checkpoint"):
        checkpoint.read_config(tmp_path / "a")  # tools that read checkpoint folders say what it is
    with pytest.raises(ValueError, match="needs no teacher"):
        lizard_jax.load(d / "teacher", teacher=d / "teacher")
    assert adapter.main(["merge", str(tmp_path / "a"), "--teacher", str(tmp_path / "other_weights"),
                         "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


def test_params_hash_is_content_only():
    x = {"b": jnp.arange(6.0).reshape(2, 3), "a": {"k": jnp.ones((2,), jnp.bfloat16)}}
    h = adapter.params_hash(x)
    assert h == adapter.params_hash({"a": {"k": np.ones((2,), jnp.bfloat16)}, "b": np.arange(6, dtype=np.float32).reshape(2, 3)})
    assert h != adapter.params_hash({**x, "b": x["b"].reshape(3, 2)})  # same bytes, other shape
    assert h != adapter.params_hash({**x, "b": x["b"].at[0, 0].set(1e-7)})


def test_eval_py_scores_an_adapter_on_its_teacher(pair, tmp_path, capsys):
    """eval.py --checkpoint ADAPTER --teacher DIR gives the full student's perplexity (shared adapters are
    evaluated without merging first)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # eval.py lives at the repo root
    import eval as eval_cli

    d = pair[0]
    adapter.extract(d / "student", d / "teacher", tmp_path / "a")
    scfg, sparams = checkpoint.read_config(d / "student"), lizard_jax.load(d / "student")[1]
    checkpoint.save(tmp_path / "s", scfg, sparams, lizard_jax.load(d / "teacher")[2])  # the reference, whole
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 4)
    common = ["--text", str(tmp_path / "t.txt"), "--seq-len", "32"]
    got = []
    for src in (["--checkpoint", str(tmp_path / "a"), "--teacher", str(d / "teacher")],
                ["--checkpoint", str(tmp_path / "s")]):
        assert eval_cli.main(["perplexity", *src, *common]) == 0
        got.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"])
    assert got[0] == pytest.approx(got[1], rel=1e-5)
