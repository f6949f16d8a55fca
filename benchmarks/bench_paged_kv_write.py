"""Paged KV write (one decode step) vs its plain-torch reference at musicgen-small shapes (H=16, Dh=64).

The reference loops on the host (it is a test oracle), so it is far slower than an indexed copy would be.
Bytes: the step's K and V read and written once.
"""
from __future__ import annotations

import torch
from _timing import device, run

from enginepy.kernels import paged_kv_write

H, DH, BLOCK, MAX_BLOCKS = 16, 64, 16, 96


def main() -> None:
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    configs = []
    for batch in (1, 2, 16):
        rows = 2 * batch
        num_blocks = rows * MAX_BLOCKS
        k_cache = torch.zeros(num_blocks, BLOCK, H, DH, device=dev, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        block_tables = torch.randperm(num_blocks, device=dev).view(rows, MAX_BLOCKS).int()
        k = torch.randn(rows, H, DH, device=dev).to(dtype)
        v = torch.randn(rows, H, DH, device=dev).to(dtype)
        positions = torch.randint(0, MAX_BLOCKS * BLOCK, (rows,), device=dev)
        nbytes = 4 * k.numel() * k.element_size()
        configs.append((
            f"rows={rows} H={H} Dh={DH} {str(dtype)[6:]}",
            lambda k=k, v=v, kc=k_cache, vc=v_cache, bt=block_tables, p=positions:
                paged_kv_write.paged_kv_write(k, v, kc, vc, bt, p),
            lambda k=k, v=v, kc=k_cache, vc=v_cache, bt=block_tables, p=positions:
                paged_kv_write.paged_kv_write_ref(k, v, kc, vc, bt, p),
            nbytes,
        ))
    run("paged_kv_write", configs)


if __name__ == "__main__":
    main()
