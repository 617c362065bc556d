"""Choosing an op's implementation, for every op folder that has a Pallas kernel (gated_linear, sparse).

impl "xla" is the op's plain-jnp form, "pallas" its kernel in `pallas_kernels` (interpret mode on a CPU, which
has no Pallas lowering), "auto" the kernel on GPU/TPU and XLA on a CPU.
"""

from __future__ import annotations

import importlib

import jax

IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str) -> str:
    """"auto" -> "pallas" on GPU/TPU, "xla" on CPU; anything else but "xla"/"pallas" is an error."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"
    return impl


def pallas_kernel(module: str, instead: str):
    """(kernel package `module`, its backend keyword arguments {backend, interpret}) for impl="pallas".

    A CPU runs the GPU (Triton) kernel in interpret mode (what the CPU tests exercise). `instead` tells the user
    what to use when the package cannot be imported."""
    try:
        # import_module, not `from pallas_kernels import ...`: it honours sys.modules, attribute cache or not
        kernels = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"impl='pallas' needs the kernel module {module}, which could not be imported ({e}); "
                          f"{instead}") from e
    backend = jax.default_backend()
    interpret = backend not in ("gpu", "tpu")
    return kernels, dict(backend="gpu" if interpret else backend, interpret=interpret)
