"""Compile the kernels for an NVIDIA Hopper GPU (sm_90) on any machine, GPU or not.

The interpreter runs the kernels' Python, not their lowering: a construct that the NVIDIA backend rejects
(a dot shape, a dtype a math op lacks, a layout it cannot build) passes under TRITON_INTERPRET=1 and
fails on the first GPU. Triton compiles to PTX and a cubin (with the ptxas its wheel ships) without a
device, so every launch configuration the launchers can pick is compiled here.

Triton chooses the interpreter for the whole process at import, so `compile_for_hopper(op)` runs this file
in a fresh interpreter without TRITON_INTERPRET: `python hopper_compile.py <op>` exits non-zero and
prints the errors if any variant of <op> fails to compile.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def compile_for_hopper(op: str) -> None:
    """Compile every listed variant of `op` for sm_90 in a subprocess; fail the calling test on any error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), op], env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, f"{op} failed to compile for sm_90:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert f"compiled {op}" in proc.stdout


def _variants(op: str):
    """(kernel, argument types, constexprs, num_warps, extra options) for every configuration the launcher picks."""
    from enginepy.kernels import cfg_mix, embedding, paged_attention, paged_kv_write, paged_prefill, sample

    def ptrs(names, ty):
        return {name: ty for name in names}

    floats = ("fp32", "fp16", "bf16")
    if op == "embedding":
        for dt in floats:
            for codebooks, block_d in ((4, 256), (8, 256), (1, 4)):
                yield (embedding._embedding_kernel,
                       {**ptrs(["table_ptr", "out_ptr"], "*" + dt), "tok_ptr": "*i64", "pos_ptr": "*i64",
                        "freq_ptr": "*fp32"},
                       dict(NUM_CODEBOOKS=codebooks, BLOCK_D=block_d), 2, {})
    elif op == "paged_kv_write":
        for dt in floats:
            for has_lengths, block_h, block_dh in ((False, 16, 64), (True, 1, 16), (True, 32, 128)):
                yield (paged_kv_write._paged_kv_write_kernel,
                       {**ptrs(["k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr"], "*" + dt), "bt_ptr": "*i32",
                        "pos_ptr": "*i64", "len_ptr": "*i32"},
                       dict(HAS_LENGTHS=has_lengths, BLOCK_H=block_h, BLOCK_DH=block_dh), 4, {})
    elif op == "paged_attention":
        for dt in floats:
            for split in (False, True):
                for block_dh in (32, 64, 128):
                    part = "*fp32" if split else "*" + dt
                    yield (paged_attention._paged_attention_decode_kernel,
                           {**ptrs(["q_ptr", "k_cache_ptr", "v_cache_ptr"], "*" + dt), "bt_ptr": "*i32",
                            "seq_lens_ptr": "*i32", "acc_ptr": part, "m_ptr": part, "l_ptr": part, "scale": "fp32"},
                           dict(SPLIT=split, BLOCK_N=64, BLOCK_DH=block_dh), 8, {})
            yield (paged_attention._paged_attention_combine_kernel,
                   {"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": "*" + dt},
                   dict(BLOCK_S=8, BLOCK_DH=64), 2, {})
    elif op == "paged_prefill":
        for dt in floats:
            for block_m, num_warps in ((16, 4), (64, 8)):
                if dt == "fp32" and block_m == 64:
                    continue  # the launcher keeps fp32 prefill in 16-query tiles
                for block_dh in (32, 64):
                    consts = dict(IEEE=dt == "fp32", UPCAST=False, BLOCK_M=block_m, BLOCK_N=32, BLOCK_DH=block_dh)
                    yield (paged_prefill._paged_prefill_kernel,
                           {**ptrs(["q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr"], "*" + dt),
                            "bt_ptr": "*i32", "start_ptr": "*i32", "qlen_ptr": "*i32", "scale": "fp32"},
                           dict(HAS_QLEN=True, **consts), num_warps, {})
    elif op == "cfg_mix":
        for dt in floats:
            for block_v in (1024, 1):
                yield (cfg_mix._cfg_mix_kernel,
                       {"logits_ptr": "*" + dt, "out_ptr": "*fp32", "cond_rows_ptr": "*i64", "null_rows_ptr": "*i64",
                        "coef_ptr": "*fp32", "temperature_ptr": "*fp32"},
                       dict(BLOCK_V=block_v), 4, {"enable_fp_fusion": False})
    elif op == "sample":
        for block_v in (16, 2048):
            for digit_bits in (1, 3):
                yield (sample._sample_kernel,
                       {"logits_ptr": "*fp32", "u_ptr": "*fp32", "out_ptr": "*i64", "greedy_ptr": "*i8",
                        "temperature_ptr": "*fp32", "limit_ptr": "*fp32", "top_p_ptr": "*i8"},
                       dict(DIGIT_BITS=digit_bits, RADIX=1 << digit_bits, BLOCK_V=block_v),
                       8 if block_v > 1024 else 4, {})
    else:
        raise ValueError(f"unknown op {op!r}")


def _main(op: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        print("triton has no NVIDIA backend here")
        return 3
    target = GPUTarget("cuda", 90, 32)
    failures = []
    count = 0
    for fn, types, consts, num_warps, extra in _variants(op):
        signature = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
        try:
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=target,
                           options={"num_warps": num_warps, **extra})
        except Exception as exc:  # report every failing variant, not just the first
            failures.append(f"{fn.__name__} {consts} {types}: {type(exc).__name__}: {exc}")
        count += 1
    if failures:
        print("\n\n".join(failures))
        return 1
    print(f"compiled {op}: {count} variants")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
