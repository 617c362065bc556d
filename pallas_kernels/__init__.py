"""Pallas kernels, one folder per op, each with its GPU (Triton) and TPU (Mosaic) files beside the reference
it must equal. Nothing here is model-specific; the ops in ``lizard_jax.ops`` dispatch to these kernels."""
