"""Fused multi-codebook embedding vs its plain-torch reference at musicgen-small shapes (K=4, V=2048, D=1024).

Rows are B' = 2B decoder rows (CFG doubles the batch). Bytes: the K table rows read, positions/tokens, the output.
"""
from __future__ import annotations

import torch
from _timing import device, run

from enginepy.kernels import embedding

K, V, D = 4, 2048, 1024


def main() -> None:
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    table = torch.randn(K, V + 1, D, device=dev).to(dtype)
    configs = []
    for batch in (1, 2, 16):
        rows = 2 * batch
        tokens = torch.randint(0, V + 1, (rows, K), device=dev)
        positions = torch.randint(0, 1500, (rows,), device=dev)
        out = torch.empty(rows, D, device=dev, dtype=dtype)
        nbytes = rows * K * D * table.element_size() + rows * D * out.element_size() + rows * (K + 1) * 8
        configs.append((
            f"rows={rows} K={K} D={D} {str(dtype)[6:]}",
            lambda t=tokens, p=positions, o=out: embedding.embedding(t, table, p, out=o),
            lambda t=tokens, p=positions: embedding.embedding_ref(t, table, p),
            nbytes,
        ))
    run("embedding", configs)


if __name__ == "__main__":
    main()
