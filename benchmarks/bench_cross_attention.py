"""Decode-step cross-attention over precomputed text K/V vs its plain-torch reference (H=16, Dh=64).

Text length 32 with per-row masks (half of the rows are CFG null rows with no valid key).
Bytes: the text K and V read, plus q and the output.
"""
from __future__ import annotations

import torch
from _timing import device, run

from enginepy.kernels import cross_attention

H, DH, TEXT = 16, 64, 32


def main() -> None:
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    configs = []
    for batch in (1, 2, 16):
        rows = 2 * batch
        q = torch.randn(rows, H, DH, device=dev).to(dtype)
        k = torch.randn(rows, TEXT, H, DH, device=dev).to(dtype)
        v = torch.randn(rows, TEXT, H, DH, device=dev).to(dtype)
        mask = torch.ones(rows, TEXT, dtype=torch.bool, device=dev)
        mask[batch:] = False
        out = torch.empty_like(q)
        nbytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
        configs.append((
            f"rows={rows} Tt={TEXT} H={H} Dh={DH} {str(dtype)[6:]}",
            lambda q=q, k=k, v=v, m=mask, o=out: cross_attention.cross_attention(q, k, v, mask=m, out=o),
            lambda q=q, k=k, v=v, m=mask: cross_attention.cross_attention_ref(q, k, v, mask=m),
            nbytes,
        ))
    run("cross_attention", configs)


if __name__ == "__main__":
    main()
