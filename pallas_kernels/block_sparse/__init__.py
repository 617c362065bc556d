"""InfLLM-V2 block-sparse attention in Pallas: forward + backward, Triton (GPU) and Mosaic (TPU) lowerings.

``block_sparse_attention`` is the public function (``attention.py``); ``BlockSizes`` holds the GPU tiles.
``python -m pallas_kernels.block_sparse.check`` checks the compiled kernel on a GPU against a float64 oracle.
"""

from pallas_kernels.block_sparse.attention import BLOCK_SIZES, block_sparse_attention
from pallas_kernels.block_sparse.common import BlockSizes

__all__ = ["BLOCK_SIZES", "BlockSizes", "block_sparse_attention"]
