"""Paged KV cache: a pool of fixed-size blocks shared by all rows, handed out by a block allocator.

Row r's position p lives in block block_tables[r, p // block_size], slot p % block_size, of every layer's
pool. Block tables and sequence lengths are static device tensors (one row per batch slot), so the decode
step has the same shapes at every step and can be captured in a CUDA graph. Blocks are given to a request
as it grows (one block per block_size positions) and taken back the moment it finishes or is aborted;
`num_free` lets tests check for leaks.
"""
from __future__ import annotations

import math

import torch

from .errors import InvalidParameter


SCRATCH_BLOCK = 0


class BlockAllocator:
    """Free list of block ids 1 .. num_blocks-1 (host side, touched between decode steps).

    Block 0 is never handed out: every unused block-table entry points at it, so a stray read lands there
    instead of in a live request's blocks.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks - 1
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))
        self._owned: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """n block ids, or InvalidParameter when the pool cannot hold them."""
        if n > len(self._free):
            raise InvalidParameter(
                f"the KV cache has {len(self._free)} free blocks of {self.num_blocks} but the request needs {n}; "
                "raise max_batch or max_duration (or kv_cache_gb) in from_pretrained"
            )
        blocks = [self._free.pop() for _ in range(n)]
        self._owned.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._owned:
                raise ValueError(f"block {b} is not allocated")
            self._owned.remove(b)
            self._free.append(b)


class PagedKVCache:
    """k, v pools [L, num_blocks, block_size, H, Dh]; block_tables int32 [max_rows, max_blocks_per_row]."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 max_rows: int, max_positions: int, dtype: torch.dtype, device: torch.device):
        """num_blocks includes the scratch block; max_positions bounds one row's length."""
        self.block_size = block_size
        self.max_blocks_per_row = math.ceil(max_positions / block_size)
        shape = (num_layers, num_blocks, block_size, num_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Unused entries point at the scratch block: live rows never read them (seq_lens bounds every row).
        self.block_tables = torch.zeros((max_rows, self.max_blocks_per_row), dtype=torch.int32, device=device)
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def blocks_for(positions: int, block_size: int) -> int:
        return math.ceil(positions / block_size)

    def grow(self, row: int, index: int) -> int:
        """Give row `row` a block for its block-table entry `index` (positions index*block_size ...); returns it.
        The table is updated on the device (one small copy, outside any captured graph)."""
        if index >= self.max_blocks_per_row:
            raise InvalidParameter(f"row {row} needs block {index} but a row has at most {self.max_blocks_per_row}; "
                                   "raise max_duration in from_pretrained")
        (block,) = self.allocator.allocate(1)
        self.block_tables[row, index] = block
        return block

    def clear_row(self, row: int, blocks: list[int]) -> None:
        """Return a row's blocks to the pool and point its table back at the scratch block."""
        self.allocator.free(blocks)
        self.block_tables[row].fill_(SCRATCH_BLOCK)
