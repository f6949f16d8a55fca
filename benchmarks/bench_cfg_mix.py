"""Fused CFG mix (+ temperature) vs its plain-torch reference at musicgen-small shapes (K=4, V=2048).

Bytes: the 2B cond/null logit rows read in the model dtype, the fp32 mixed logits written.
"""
from __future__ import annotations

import torch
from _timing import device, run

from enginepy.kernels import cfg_mix

K, V = 4, 2048


def main() -> None:
    dev = device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    configs = []
    for batch in (1, 2, 16):
        logits = torch.randn(2 * batch, K, V, device=dev).to(dtype)
        out = torch.empty(batch, K, V, device=dev)
        nbytes = logits.numel() * logits.element_size() + out.numel() * 4
        configs.append((
            f"B={batch} K={K} V={V} {str(dtype)[6:]}",
            lambda x=logits, o=out: cfg_mix.cfg_mix(x, 3.0, 1.0, out=o),
            lambda x=logits: cfg_mix.cfg_mix_ref(x, 3.0, 1.0),
            nbytes,
        ))
    run("cfg_mix", configs)


if __name__ == "__main__":
    main()
