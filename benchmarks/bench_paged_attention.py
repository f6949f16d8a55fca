"""Paged decode attention vs its plain-torch reference at musicgen-small shapes (H=16, Dh=64, block 16).

Each row's cache holds seq_len positions (the step of a 30 s render reaches 1503). Bytes: the K and V
read for every cached position, plus q and the output.
"""
from __future__ import annotations

import torch
from _timing import device, run

from enginepy.kernels import paged_attention

H, DH, BLOCK, MAX_BLOCKS = 16, 64, 16, 96  # capacity 1536 positions


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
        q = torch.randn(rows, H, DH, device=dev).to(dtype)
        out = torch.empty_like(q)
        for seq_len in (250, 1500):
            lens = torch.full((rows,), seq_len, dtype=torch.int32, device=dev)
            nbytes = 2 * rows * seq_len * H * DH * k_cache.element_size() + 2 * q.numel() * q.element_size()
            configs.append((
                f"rows={rows} H={H} Dh={DH} L={seq_len} {str(dtype)[6:]}",
                lambda q=q, kc=k_cache, vc=v_cache, bt=block_tables, n=lens, o=out:
                    paged_attention.paged_attention_decode(q, kc, vc, bt, n, out=o),
                lambda q=q, kc=k_cache, vc=v_cache, bt=block_tables, n=lens:
                    paged_attention.paged_attention_decode_ref(q, kc, vc, bt, n),
                nbytes,
            ))
    run("paged_attention", configs, cpu_iters=1)


if __name__ == "__main__":
    main()
