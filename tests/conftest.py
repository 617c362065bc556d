import os

import pytest

# Eight simulated CPU devices for the mesh/shard_map tests; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_collection_modifyitems(items):
    """pyproject's per-test timeout bounds the default suite; a -m slow test (8K-token prompts on the real
    teacher take hours on a CPU) runs without one unless it sets its own @pytest.mark.timeout."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(0))


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The shipped teacher, read once per session (transformers parses the GGUF slowly):
    (transformers model in fp32, its tokenizer, the converted lizard_jax checkpoint folder)."""
    from lizard_jax.convert import convert_model, load_hf, shipped_smollm2

    hf, tok = load_hf(shipped_smollm2())
    ck = tmp_path_factory.mktemp("smollm2") / "ck"
    convert_model(hf, ck, tokenizer=tok)
    return hf, tok, ck
