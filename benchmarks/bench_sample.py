"""Top-k / top-p sampling vs its plain-torch reference at musicgen-small shapes (N = B*K rows, V=2048).

Bytes: the fp32 logits read once (the kernel keeps each row in registers), u read, tokens written.
"""
from __future__ import annotations

import torch
from _timing import device, run

from enginepy.kernels import sample

K, V = 4, 2048


def main() -> None:
    dev = device()
    configs = []
    for batch in (1, 2, 16):
        rows = batch * K
        logits = 3 * torch.randn(rows, V, device=dev)
        u = torch.rand(rows, device=dev)
        out = torch.empty(rows, dtype=torch.int64, device=dev)
        nbytes = logits.numel() * 4 + rows * (4 + 8)
        for name, settings in (("top_k=250", dict(top_k=250)), ("top_p=0.9", dict(top_k=0, top_p=0.9)),
                               ("greedy", dict(use_sampling=False))):
            configs.append((
                f"N={rows} V={V} {name}",
                lambda x=logits, w=u, o=out, s=settings: sample.sample(x, w, out=o, **s),
                lambda x=logits, w=u, s=settings: sample.sample_ref(x, w, **s),
                nbytes,
            ))
    run("sample", configs)


if __name__ == "__main__":
    main()
