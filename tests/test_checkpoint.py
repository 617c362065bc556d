"""Orbax checkpoints, sharded restore, and the clear errors of conversion and loading."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lizard_jax
from lizard_jax import checkpoint
from lizard_jax.checkpoint import CheckpointError
from lizard_jax.convert import ConversionError, convert, convert_model
from lizard_jax.models import Transformer, init_params
from lizard_jax.numerics import assert_close
from lizard_jax.sharding import make_mesh
from lizard_jax.testing import tiny_config, tiny_hf_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = tiny_config(num_heads=4, num_kv_heads=2, ffn_dim=128)
    params = init_params(cfg, jax.random.key(0))
    path = tmp_path_factory.mktemp("ck") / "model"
    checkpoint.save(path, cfg, params)
    return cfg, params, path


def test_round_trip_exact(saved):
    cfg, params, path = saved
    model, restored, tok = lizard_jax.load(path)
    assert model.cfg == cfg and tok is None
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           params, restored)


def test_restore_on_2x4_mesh_is_sharded_and_equal(saved):
    cfg, params, path = saved
    mesh = make_mesh({"data": 2, "tensor": 4})
    model, restored, _ = lizard_jax.load(path, mesh=mesh)
    q = restored["layers_0"]["attn"]["q_proj"]["kernel"]  # [embed, heads, head_dim]: heads over tensor
    assert q.sharding.spec[1] == "tensor" and len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (cfg.d_model, cfg.num_heads // 4, cfg.head_dim)
    kv = restored["layers_0"]["attn"]["k_proj"]["kernel"]  # 2 kv heads do not divide by 4: replicated
    assert kv.sharding.spec[1] is None
    toks = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size)
    ref = Transformer(cfg).apply({"params": params}, toks)
    out = jax.jit(lambda p, t: model.apply({"params": p}, t))(restored, toks)
    assert_close(out, ref, rtol=1e-5)


def test_save_refuses_existing_and_mismatched(saved, tmp_path):
    cfg, params, path = saved
    with pytest.raises(FileExistsError):
        checkpoint.save(path, cfg, params)
    bad = jax.tree_util.tree_map(lambda x: x, params)
    bad["layers_0"]["mlp"]["up_proj"]["kernel"] = jnp.zeros((3, 3))
    with pytest.raises(CheckpointError, match="shape mismatch.*up_proj"):
        checkpoint.save(tmp_path / "x", cfg, bad)
    assert not (tmp_path / "x").exists()


def test_checkpoint_not_fitting_config(saved, tmp_path):
    cfg, params, path = saved
    other = tmp_path / "other"
    shutil.copytree(path, other)
    data = json.loads((other / "config.json").read_text())
    data["ffn_dim"] = 64
    (other / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="do not fit.*mlp"):
        lizard_jax.load(other)


def test_half_written_and_corrupt_checkpoints(saved, tmp_path):
    _, _, path = saved
    half = tmp_path / "half"
    shutil.copytree(path, half)
    (half / checkpoint.MARKER).unlink()
    with pytest.raises(CheckpointError, match="not a complete"):
        lizard_jax.load(half)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(path, corrupt)
    for f in (corrupt / "params").rglob("*"):
        if f.is_file() and "METADATA" not in f.name and f.stat().st_size > 100:
            f.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError):
        lizard_jax.load(corrupt)
    (corrupt / "params" / "_METADATA").unlink()
    with pytest.raises(CheckpointError, match="metadata"):
        lizard_jax.load(corrupt)
    shutil.rmtree(corrupt / "params")
    with pytest.raises(CheckpointError, match="no parameters"):
        lizard_jax.load(corrupt)
    with pytest.raises(FileNotFoundError):
        lizard_jax.load(tmp_path / "nope")


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(checkpoint._checkpointer()), "wait_until_finished", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "m", cfg, params)
    assert list(tmp_path.iterdir()) == []


def test_convert_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        convert(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert(tmp_path / "empty", tmp_path / "out")
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path / "noweights")
    for f in (tmp_path / "noweights").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        convert(tmp_path / "noweights", tmp_path / "out")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="not a .gguf"):
        convert(tmp_path / "x.bin", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ConversionError, match="unsupported architecture 'GPT2LMHeadModel'"):
        convert_model(gpt2, tmp_path / "out")
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConversionError, match="unsupported architecture"):
        convert(tmp_path / "gpt2", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_state_dict_with_wrong_shapes(tmp_path):
    from lizard_jax.convert import config_from_hf, params_from_state_dict

    hf = tiny_hf_model("llama")
    cfg = config_from_hf(hf.config, "LlamaForCausalLM")
    sd = dict(hf.state_dict())
    sd["model.layers.1.self_attn.q_proj.weight"] = sd["model.layers.1.self_attn.q_proj.weight"][:32]
    with pytest.raises(ConversionError, match="does not fit"):
        params_from_state_dict(cfg, sd)
    sd = dict(hf.state_dict())
    del sd["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ConversionError, match="up_proj"):
        params_from_state_dict(cfg, sd)


def test_folder_round_trip_through_cli(tmp_path):
    from lizard_jax.convert.__main__ import main

    hf = tiny_hf_model("mistral", tie=False)
    hf.save_pretrained(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), "--out", str(tmp_path / "ck"), "--dtype", "bfloat16"]) == 0
    model, params, _ = lizard_jax.load(tmp_path / "ck")
    assert params["embed"]["embedding"].dtype == jnp.bfloat16 and model.cfg.dtype == "bfloat16"
