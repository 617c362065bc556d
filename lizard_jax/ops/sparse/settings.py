"""InfLLM-V2 settings: the one home of the paper's values.

MiniCPM4 / MiniCPM-SALA (arXiv 2509.24663, 2602.11761; reference/papers.md B): key blocks of 64, the top 64
blocks, compressed keys mean-pooled with kernel 32 / stride 16, 1 initial block, a 2048-token local window,
dense attention below 8192 keys. The selection functions default to `PAPER`, the sparse layer's spec extends
`InfLLMConfig`, and `sala.sparse_teacher` starts from it.

Selection granularity (``selection``): the paper (and its CUDA code) selects key blocks per query token, shared
over the query heads of a GQA group ("token": the reference semantics, prefill == token-by-token decode). Our
fast kernel runs one selection per query block of ``block_size`` rows, the token scores summed over its rows
("block": an approximation, a row's choice also depends on the other rows of its block). The default is "block",
MEASURED on SmolLM2-135M as a training-free sparse teacher at 8K (benchmarks/RESULTS.md, "InfLLM-V2 sparse
teacher"): per-token selection has 0.4% lower perplexity with 1/4 of the blocks and 0.8% with 1/8, and no worse
passkey (2/10 vs 2/10 and 2/10 vs 1/10; dense 5/10), but only "block" runs the Pallas kernels
("token" is masked dense work on a GPU: no saving over dense attention), and a sparse layer exists for its speed.
Choose "token" where prefill must equal decoding exactly or accuracy matters more than time.
"""

from __future__ import annotations

import dataclasses

# jax only: the kernel package loads Pallas on first use of the kernel, not for these names
from pallas_kernels.block_sparse.common import DESIGNS, BlockSizes

SELECTIONS = ("token", "block")


@dataclasses.dataclass(frozen=True)
class InfLLMConfig:
    """InfLLM-V2 settings (defaults: the paper's), plus the Pallas kernel's static options: ``variant`` (one of
    ``pallas_kernels.block_sparse.DESIGNS``; None: the kernel's default) and ``block_sizes`` (its tiles,
    ``BlockSizes``; None: ``BlockSizes.get_default``). Those two only affect impl "pallas".

    ``selection``: "token" (the paper's: each query token chooses its own blocks, shared over its GQA group's
    heads; exact prefill == decode) or "block" (one choice per query block of ``block_size`` rows, scores summed
    over the rows; what the Pallas kernel runs). With "token" every impl runs the exact per-token XLA form
    (``block_sparse_attention(query_block=1)``, masked dense per chunk of rows: O(seq_q * seq_k) work): the
    Pallas kernels take one list per query block only, so impl "pallas"/"auto" fall back to it."""

    block_size: int = 64
    topk: int = 64
    kernel: int = 32
    stride: int = 16
    init_blocks: int = 1
    local_window: int = 2048
    dense_below: int = 8192
    variant: str | None = None
    block_sizes: BlockSizes | None = None
    selection: str = "block"

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"InfLLMConfig.selection={self.selection!r} must be one of {SELECTIONS}")
        if self.variant is not None and self.variant not in DESIGNS:
            raise ValueError(f"InfLLMConfig.variant={self.variant!r} must be one of {DESIGNS} or None")
        for name in ("block_size", "topk", "kernel", "stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"InfLLMConfig.{name}={getattr(self, name)} must be positive")
        for name in ("init_blocks", "local_window", "dense_below"):
            if getattr(self, name) < 0:
                raise ValueError(f"InfLLMConfig.{name}={getattr(self, name)} must be >= 0")


PAPER = InfLLMConfig()
