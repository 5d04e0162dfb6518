"""Linear algebra the calibrated methods share."""

from __future__ import annotations

import torch

# x xᵀ of an input this wide or wider is computed as 4 x 4 blocks, those on and above the diagonal
# mirrored (10 of 16 products): a 1536-column Gram matrix (down_proj's inputs) took 0.6-0.75x the
# time on one CPU thread, with the same bits as the whole product there; 576 columns gained nothing.
GRAM_BLOCKED_COLUMNS = 1024
GRAM_BLOCKS = 4


def gram(x: torch.Tensor) -> torch.Tensor:
    """x xᵀ for x [columns, tokens]: symmetric, so a wide one is computed block by block on and above
    the diagonal and mirrored below it (`GRAM_BLOCKED_COLUMNS`)."""
    columns = x.shape[0]
    if columns < GRAM_BLOCKED_COLUMNS:
        return x @ x.t()
    product = torch.empty(columns, columns, device=x.device, dtype=x.dtype)
    size = -(-columns // GRAM_BLOCKS)
    for i in range(0, columns, size):
        for j in range(i, columns, size):
            block = x[i:i + size] @ x[j:j + size].t()
            product[i:i + size, j:j + size] = block
            product[j:j + size, i:i + size] = block.t()
    return product
