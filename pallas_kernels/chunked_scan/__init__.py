"""Chunkwise-parallel gated linear attention, forward and backward, as Pallas kernels.

    S_0 = initial_state or 0,   S_t = diag(exp(log_g_t)) S_{t-1} + k_t^T v_t,   o_t = q_t S_t

``gla(q, k, v, log_g, *, initial_state=None, return_final_state=False, backend="gpu"|"tpu",
interpret=False, block_sizes=None, variant="v1", segment_ids=None)``, ``variant`` one of
``VARIANTS = ("v1", "v2")``; log_g ``[..., dk]`` per dimension or ``[..., 1]`` per head (fast path); segment_ids
``[batch, seq]`` int for packed documents (the state restarts at each segment; ``common.py`` says how).

Files: ``scan.py`` (validation, padding, the custom_vjp glue, ``gla``), ``common.py`` (BlockSizes, the
per-chunk math and its overflow argument), ``gpu.py`` (Pallas Triton, v1), ``gpu_v2.py`` (Pallas Triton, v2:
the state kept in registers), ``tpu.py`` (Mosaic, both variants), ``reference.py`` (a pure-jnp oracle in
the same chunk form, and the float64 recurrence), ``check.py`` (``python -m pallas_kernels.chunked_scan.check``:
compiled GPU check), ``triton_report.py`` (compile the GPU
kernels for sm_90 without a GPU: registers, spills), ``cost.py`` (static HBM bytes, FLOPs and launches per
variant).
"""

from pallas_kernels.chunked_scan.common import VARIANTS, BlockSizes
from pallas_kernels.chunked_scan.reference import gla_chunk_reference
from pallas_kernels.chunked_scan.scan import gla

__all__ = ["VARIANTS", "BlockSizes", "gla", "gla_chunk_reference"]
