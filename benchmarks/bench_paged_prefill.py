"""Causal paged prefill (a chunk of queries per row) vs its plain-torch reference (H=16, Dh=64, block 16).

Bytes: K and V of every cached position up to the chunk's end, read once per (row, head), plus q and out.
"""
from __future__ import annotations

import torch
from _timing import device, run

from enginepy.kernels import paged_prefill

H, DH, BLOCK, MAX_BLOCKS = 16, 64, 16, 32  # capacity 512 positions


def main() -> None:
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    configs = []
    for batch in (1, 2, 16):
        rows = 2 * batch
        num_blocks = rows * MAX_BLOCKS
        k_cache = torch.randn(num_blocks, BLOCK, H, DH, device=dev).to(dtype)
        v_cache = torch.randn(num_blocks, BLOCK, H, DH, device=dev).to(dtype)
        block_tables = torch.randperm(num_blocks, device=dev).view(rows, MAX_BLOCKS).int()
        chunk = 128
        q = torch.randn(rows, chunk, H, DH, device=dev).to(dtype)
        start = torch.full((rows,), 256, dtype=torch.int32, device=dev)
        out = torch.empty_like(q)
        nbytes = 2 * rows * (256 + chunk) * H * DH * k_cache.element_size() + 2 * q.numel() * q.element_size()
        configs.append((
            f"rows={rows} Tq={chunk} start=256 H={H} Dh={DH} {str(dtype)[6:]}",
            lambda q=q, kc=k_cache, vc=v_cache, bt=block_tables, s=start, o=out:
                paged_prefill.paged_prefill(q, kc, vc, bt, s, out=o),
            lambda q=q, kc=k_cache, vc=v_cache, bt=block_tables, s=start:
                paged_prefill.paged_prefill_ref(q, kc, vc, bt, s),
            nbytes,
        ))
    run("paged_prefill", configs, cpu_iters=1)


if __name__ == "__main__":
    main()
