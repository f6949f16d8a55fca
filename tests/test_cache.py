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


def test_assign_fills_tables_and_release_restores_the_pool():
    cache = PagedKVCache(2, 3, 4, num_blocks=1 + 4 * 3, block_size=4, max_rows=4, max_positions=12,
                         dtype=torch.float32, device=torch.device("cpu"))
    owned = cache.assign(rows=3, positions=9)  # 3 blocks per row
    assert [len(o) for o in owned] == [3, 3, 3]
    assert cache.allocator.num_free == 12 - 9
    for r in range(3):
        assert cache.block_tables[r, :3].tolist() == owned[r]
    assert (cache.block_tables[3] == SCRATCH_BLOCK).all()  # padding rows write only to the scratch block
    cache.release(owned)
    assert cache.allocator.num_free == 12


def test_assign_failure_leaks_nothing():
    cache = PagedKVCache(1, 1, 4, num_blocks=1 + 5, block_size=2, max_rows=4, max_positions=4,
                         dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(InvalidParameter, match="free blocks"):
        cache.assign(rows=3, positions=4)  # needs 6 blocks, has 5
    assert cache.allocator.num_free == 5
    with pytest.raises(InvalidParameter, match="5 positions need 3 blocks per row but the cache allows 2"):
        cache.assign(rows=1, positions=5)
