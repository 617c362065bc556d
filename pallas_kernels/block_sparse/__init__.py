"""InfLLM-V2 block-sparse attention in Pallas: forward + backward, Triton (GPU) and Mosaic (TPU) lowerings.

``block_sparse_attention`` is the public function (``attention.py``); ``BlockSizes`` holds the GPU tiles;
``DESIGNS`` names the kernel designs (``variant=``): v1 (``gpu.py`` / ``tpu.py``, the default) and v2
(``gpu_v2.py`` / ``tpu_v2.py``). ``cost.py`` counts their HBM bytes, FLOPs and launches statically.
``python -m pallas_kernels.block_sparse.check`` checks the compiled kernel on a GPU against a float64 oracle.

The kernels (and Pallas) are imported on first use of ``block_sparse_attention`` / ``BLOCK_SIZES``, so that
model configs can name ``BlockSizes`` / ``DESIGNS`` (``common.py``: jax only) without loading them.
"""

from pallas_kernels.block_sparse.common import DESIGNS, BlockSizes

__all__ = ["BLOCK_SIZES", "BlockSizes", "DESIGNS", "block_sparse_attention"]


def __getattr__(name: str):
    if name in ("BLOCK_SIZES", "block_sparse_attention"):
        from pallas_kernels.block_sparse import attention

        return getattr(attention, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
