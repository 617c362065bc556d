"""Export to transformers: logits equal after from_pretrained, exact tensor round trip, students refused."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lizard_jax
from lizard_jax import checkpoint
from lizard_jax.convert import convert_model, from_hf_model
from lizard_jax.export import ExportError, export, main
from lizard_jax.models import abstract_params
from lizard_jax.numerics import rel_err
from lizard_jax.recipes import student_config
from lizard_jax.testing import char_tokenizer, tiny_hf_model
from lizard_jax.textio import read_text

LLAMA3 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}}


def _hf_logits(model, toks):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(toks))).logits.numpy()


@pytest.mark.parametrize("arch,tie,extra", [
    ("llama", False, {**LLAMA3, "attention_bias": True}),  # llama3 RoPE; q/k/v biases (+ the zero o_proj bias)
    ("qwen2", True, {}),
    ("mistral", False, {"sliding_window": 16}),
], ids=["llama-llama3rope-bias", "qwen2-tied", "mistral-window"])
def test_export_round_trip(tmp_path, arch, tie, extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = tiny_hf_model(arch, tie=tie, **extra)
    if arch == "llama":  # lizard_jax has no o_proj bias: a converted teacher has it all zero
        for layer in hf.model.layers:
            torch.nn.init.zeros_(layer.self_attn.o_proj.bias)
    convert_model(hf, tmp_path / "ck", tokenizer=char_tokenizer(128))
    assert main([str(tmp_path / "ck"), "--out", str(tmp_path / "hf")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    back.config._attn_implementation = hf.config._attn_implementation = "eager"
    assert type(back) is type(hf)
    # every tensor comes back exactly (tied lm_head included)
    want, got = hf.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    # and the transformers model computes what lizard_jax computes
    model, params, _ = lizard_jax.load(tmp_path / "ck")
    toks = np.random.default_rng(0).integers(0, 128, (2, 40))
    assert rel_err(_hf_logits(back, toks), model.apply({"params": params}, jnp.asarray(toks))) < 1e-4
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("ab")["input_ids"] == char_tokenizer(128)("ab")["input_ids"]


def test_bfloat16_export_and_overwrite(tmp_path):
    from safetensors.numpy import load_file

    convert_model(tiny_hf_model("qwen2"), tmp_path / "ck")
    export(tmp_path / "ck", tmp_path / "hf", dtype="bfloat16")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {str(a.dtype) for a in tensors.values()} == {"bfloat16"}
    assert not (tmp_path / "hf" / "tokenizer.json").exists()  # the checkpoint has none
    with pytest.raises(FileExistsError):
        export(tmp_path / "ck", tmp_path / "hf")
    export(tmp_path / "ck", tmp_path / "hf", overwrite=True, max_shard_bytes=20_000)  # sharded with an index
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and not (tmp_path / "hf" / "model.safetensors").exists()


def test_student_is_refused_with_the_reason(tmp_path, capsys):
    tcfg, tparams = from_hf_model(tiny_hf_model("llama"))
    scfg = student_config(tcfg, {"layers": {1: {"kind": "sliding_window", "window": 4}}})
    # the teacher's weights and the layer's one new parameter (no init: only the refusal matters here)
    sparams = jax.tree_util.tree_map(lambda x: x, tparams)
    meta = nn.unbox(abstract_params(scfg))["layers_1"]["attn"]["meta_logits"]
    sparams["layers_1"]["attn"]["meta_logits"] = jnp.zeros(meta.shape, meta.dtype)
    checkpoint.save(tmp_path / "student", scfg, sparams)
    with pytest.raises(ExportError, match=r"layer\(s\) \[1\].*sliding_window.*softmax attention only"):
        export(tmp_path / "student", tmp_path / "hf")
    assert main([str(tmp_path / "student"), "--out", str(tmp_path / "hf")]) == 2
    assert "adapter" in capsys.readouterr().err and not Path(tmp_path / "hf").exists()
    windowed = tcfg.replace(attention=({"kind": "softmax", "window": 8},) * tcfg.num_layers)
    checkpoint.save(tmp_path / "windowed_llama", windowed, tparams)
    with pytest.raises(ExportError, match="do not exist in transformers' Llama"):
        export(tmp_path / "windowed_llama", tmp_path / "hf")


@pytest.mark.slow
def test_smollm2_export_round_trip(tmp_path, smollm2):
    """The shipped SmolLM2-135M teacher: convert -> export -> from_pretrained gives back every tensor exactly, the
    same logits as the original transformers model, and the same tokenizer (conftest converts it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, tok, ck = smollm2
    assert main([str(ck), "--out", str(tmp_path / "hf")]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    want, got = hf.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    text = read_text(Path(__file__).resolve().parents[1] / "data" / "wikitext-2" / "valid.txt.xz")[:3000]
    back_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok(text, add_special_tokens=False)["input_ids"][:256]
    assert back_tok(text, add_special_tokens=False)["input_ids"][:256] == ids
    assert back_tok.chat_template == tok.chat_template
    ref, out = _hf_logits(hf, [ids]), _hf_logits(back, [ids])
    assert rel_err(out, ref) <= 1e-4
    model, params, _ = lizard_jax.load(ck)
    print(f"exported vs transformers rel {rel_err(out, ref):.2e}; vs lizard_jax "
          f"{rel_err(out, model.apply({'params': params}, jnp.asarray([ids]))):.2e}")
