import os
import tempfile

import pytest

# Eight simulated CPU devices for the mesh/shard_map tests; must be set before jax is imported. Test shapes are tiny,
# so compiling is nearly all of the suite's time: LLVM's optimisation of the generated CPU code is skipped (level 0;
# the arithmetic is the same, fast-math stays off), a third less time (test_layers_sala.py: 121 s -> 81 s, cold).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA compiles are most of the suite's time on a CPU. A persistent cache (keyed by the program, jax version and
# flags, so a code change misses) makes a rerun of the suite about 4x cheaper; the first run costs the same as
# without it. Environment variables, so the eval.py / train.py subprocesses of the tests share it.
# JAX_ENABLE_COMPILATION_CACHE=false measures a cold run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"lizard_jax-xla-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # most compiles here are under a second
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


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
