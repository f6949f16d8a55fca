"""Block allocator and paged KV cache bookkeeping."""
from __future__ import annotations

import pytest
import torch

from enginepy.cache import SCRATCH_BLOCK, BlockAllocator, PagedKVCache
from enginepy.errors import InvalidParameter


def test_allocator_hands_out_distinct_blocks_and_takes_them_back():
    alloc = BlockAllocator(9)
    assert alloc.num_free == 8
    a, b = alloc.allocate(3), alloc.allocate(5)
    assert len(set(a) | set(b)) == 8 and SCRATCH_BLOCK not in a + b
    assert alloc.num_free == 0
    with pytest.raises(InvalidParameter, match="the KV cache has 0 free blocks of 8 but the request needs 1; raise max_batch"):
        alloc.allocate(1)
    alloc.free(a)
    assert alloc.num_free == 3
    with pytest.raises(ValueError, match=f"block {a[0]} is not allocated"):
        alloc.free(a[:1])


def test_rows_grow_block_by_block_and_clear_restores_the_pool():
    cache = PagedKVCache(2, 3, 4, num_blocks=1 + 4 * 3, block_size=4, max_rows=4, max_positions=12,
                         dtype=torch.float32, device=torch.device("cpu"))
    owned = {r: [cache.grow(r, i) for i in range(3)] for r in range(3)}
    assert cache.allocator.num_free == 12 - 9
    assert len({b for blocks in owned.values() for b in blocks}) == 9
    for r in range(3):
        assert cache.block_tables[r, :3].tolist() == owned[r]
    assert (cache.block_tables[3] == SCRATCH_BLOCK).all()  # an unused row points only at the scratch block
    cache.clear_row(1, owned[1])
    assert cache.allocator.num_free == 6 and (cache.block_tables[1] == SCRATCH_BLOCK).all()
    assert cache.block_tables[0, :3].tolist() == owned[0]  # the other rows are untouched


def test_growth_beyond_a_row_or_the_pool_is_refused():
    cache = PagedKVCache(1, 1, 4, num_blocks=1 + 3, block_size=2, max_rows=4, max_positions=4,
                         dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(InvalidParameter, match="row 0 needs block 2 but a row has at most 2"):
        cache.grow(0, 2)
    cache.grow(0, 0), cache.grow(0, 1), cache.grow(1, 0)
    with pytest.raises(InvalidParameter, match="the KV cache has 0 free blocks of 3"):
        cache.grow(1, 1)
    assert cache.block_tables[1, 1] == SCRATCH_BLOCK
