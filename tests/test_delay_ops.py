"""The C++/CUDA delay-pattern ops (enginepy._C via enginepy.delay_ops) against the plain-torch oracle
in enginepy.pattern and an independent numpy loop: fixed cases, property tests, opcheck, bad input,
strided inputs, and the same comparisons on CUDA (including inside a captured CUDA graph)."""
from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import enginepy
from enginepy import delay_ops, pattern
from isolated import run_isolated

SPECIAL = 2048
MONO = [0, 1, 2, 3]
STEREO = [0, 0, 1, 1, 2, 2, 3, 3]
FIXED_DELAYS = [MONO, STEREO, [2, 0, 5], [0], [3], [0, 0, 0]]


def numpy_scatter(codes: np.ndarray, delays: list[int], special: int) -> np.ndarray:
    """The pattern layout written out element by element: [B, K, T] -> [B, K, T + max(delays) + 1]."""
    b, k, t = codes.shape
    out = np.full((b, k, t + max(delays) + 1), special, dtype=np.int64)
    for i in range(b):
        for j in range(k):
            for f in range(t):
                out[i, j, 1 + f + delays[j]] = codes[i, j, f]
    return out


def numpy_gather(pat: np.ndarray, delays: list[int]) -> np.ndarray:
    """[B, K, S] -> [B, K, S - 1 - max(delays)], element by element."""
    b, k, s = pat.shape
    t = s - 1 - max(delays)
    out = np.empty((b, k, t), dtype=np.int64)
    for i in range(b):
        for j in range(k):
            for f in range(t):
                out[i, j, f] = pat[i, j, 1 + f + delays[j]]
    return out


def random_codes(shape, seed: int, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, SPECIAL, shape, generator=gen).to(device)


def step_through(codes, full, d, step_offsets, lengths, prompt_lengths, special=SPECIAL):
    """Runs every decode step with delay_step_input / delay_step_write (the model 'predicts' the true
    next pattern column). Returns the step inputs seen by each row, which must equal its pattern columns."""
    b = codes.shape[0]
    max_delay = int(d.max())
    seen = [[] for _ in range(b)]
    total = int(lengths.max()) + max_delay + int(step_offsets.max()) + 2
    patterns = [pattern.delay_scatter(full[r : r + 1, :, : int(lengths[r])].cpu(), d.cpu(), special)[0] for r in range(b)]
    for s in range(total):
        step = (s - step_offsets).clamp(min=0)
        tokens = delay_ops.delay_step_input(codes, step, lengths, d, special)
        predicted = torch.full_like(tokens, special)
        for r in range(b):
            col = int(step[r])
            if col < patterns[r].shape[1]:
                seen[r].append((col, tokens[r].cpu()))
            if col + 1 < patterns[r].shape[1]:
                predicted[r] = patterns[r][:, col + 1].to(codes.device)
        delay_ops.delay_step_write(codes, predicted, step, lengths, prompt_lengths, d)
    return seen, patterns


# ---------------------------------------------------------------------------------------------- fixed cases


@pytest.mark.parametrize("delays", FIXED_DELAYS)
@pytest.mark.parametrize("b,t", [(1, 0), (1, 1), (2, 7), (3, 40)])
def test_scatter_gather_match_oracle_and_numpy(delays, b, t):
    codes = random_codes((b, len(delays), t), seed=b * 100 + t)
    d = torch.tensor(delays)
    got = delay_ops.delay_scatter(codes, d, SPECIAL)
    assert got.shape == (b, len(delays), t + max(delays) + 1)
    assert torch.equal(got, pattern.delay_scatter(codes, d, SPECIAL))
    np.testing.assert_array_equal(got.numpy(), numpy_scatter(codes.numpy(), delays, SPECIAL))
    # gather of an arbitrary pattern (not only one made by scatter): the non-code entries are ignored
    arbitrary = random_codes(got.shape, seed=7)
    back = delay_ops.delay_gather(arbitrary, d)
    assert torch.equal(back, pattern.delay_gather(arbitrary, d))
    np.testing.assert_array_equal(back.numpy(), numpy_gather(arbitrary.numpy(), delays))
    assert torch.equal(delay_ops.delay_gather(got, d), codes)


def test_scatter_of_empty_batch_and_zero_codebooks():
    codes = torch.empty((0, 4, 5), dtype=torch.int64)
    assert delay_ops.delay_scatter(codes, torch.tensor(MONO), SPECIAL).shape == (0, 4, 9)
    none = torch.empty((2, 0, 5), dtype=torch.int64)
    assert delay_ops.delay_scatter(none, torch.empty(0, dtype=torch.int64), SPECIAL).shape == (2, 0, 6)


@pytest.mark.parametrize("delays", [MONO, STEREO, [2, 0, 5]])
def test_stepping_rebuilds_pattern_and_codes_with_ragged_rows(delays):
    d = torch.tensor(delays)
    k, t_max = len(delays), 9
    full = random_codes((4, k, t_max), seed=3)
    lengths = torch.tensor([9, 5, 1, 0])
    prompt_lengths = torch.tensor([0, 2, 1, 0])
    offsets = torch.tensor([0, 3, 1, 2])  # rows at different progress share one batch
    codes = torch.full((4, k, t_max), -1)
    for r in range(4):
        codes[r, :, : prompt_lengths[r]] = full[r, :, : prompt_lengths[r]]
    seen, patterns = step_through(codes, full, d, offsets, lengths, prompt_lengths)
    for r in range(4):
        cols = {col: tok for col, tok in seen[r]}
        assert sorted(cols) == list(range(patterns[r].shape[1]))
        for col, tok in cols.items():
            assert torch.equal(tok, patterns[r][:, col]), (r, col)
        assert torch.equal(codes[r, :, : lengths[r]], full[r, :, : lengths[r]])
        assert bool((codes[r, :, lengths[r] :] == -1).all()), "nothing written past the row's length"


# ------------------------------------------------------------------------------------------ property tests


@st.composite
def delay_lists(draw) -> list[int]:
    kind = draw(st.sampled_from(["mono", "stereo", "random"]))
    if kind == "stereo":
        return STEREO
    k = draw(st.integers(1, 9))
    if kind == "mono":
        return list(range(k))
    return draw(st.lists(st.integers(0, 5), min_size=k, max_size=k))


@settings(max_examples=60, deadline=None)
@given(delays=delay_lists(), b=st.integers(1, 5), t=st.integers(0, 40), seed=st.integers(0, 2**31 - 1))
def test_property_scatter_gather(delays, b, t, seed):
    d = torch.tensor(delays)
    codes = random_codes((b, len(delays), t), seed)
    pat = delay_ops.delay_scatter(codes, d, SPECIAL)
    assert torch.equal(pat, pattern.delay_scatter(codes, d, SPECIAL))
    np.testing.assert_array_equal(pat.numpy(), numpy_scatter(codes.numpy(), delays, SPECIAL))
    assert torch.equal(delay_ops.delay_gather(pat, d), codes)
    arbitrary = random_codes(pat.shape, seed + 1)
    np.testing.assert_array_equal(delay_ops.delay_gather(arbitrary, d).numpy(), numpy_gather(arbitrary.numpy(), delays))


@settings(max_examples=60, deadline=None)
@given(delays=delay_lists(), b=st.integers(1, 5), t_max=st.integers(0, 40), data=st.data())
def test_property_step_ops_match_oracle(delays, b, t_max, data):
    d = torch.tensor(delays)
    k = len(delays)
    seed = data.draw(st.integers(0, 2**31 - 1))
    rows = st.lists(st.integers(0, t_max), min_size=b, max_size=b)
    lengths = torch.tensor(data.draw(rows))
    prompt_lengths = torch.tensor([data.draw(st.integers(0, int(n))) for n in lengths])
    step = torch.tensor(data.draw(st.lists(st.integers(0, t_max + 7), min_size=b, max_size=b)))
    codes = random_codes((b, k, t_max), seed)
    assert torch.equal(
        delay_ops.delay_step_input(codes, step, lengths, d, SPECIAL),
        pattern.delay_step_input(codes, step, lengths, d, SPECIAL),
    )
    tokens = random_codes((b, k), seed + 1)
    got, want = codes.clone(), codes.clone()
    delay_ops.delay_step_write(got, tokens, step, lengths, prompt_lengths, d)
    pattern.delay_step_write(want, tokens, step, lengths, prompt_lengths, d)
    assert torch.equal(got, want)


@settings(max_examples=25, deadline=None)
@given(delays=delay_lists(), b=st.integers(1, 5), t_max=st.integers(1, 12), data=st.data())
def test_property_stepping_reproduces_pattern(delays, b, t_max, data):
    d = torch.tensor(delays)
    full = random_codes((b, len(delays), t_max), data.draw(st.integers(0, 2**31 - 1)))
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, t_max), min_size=b, max_size=b)))
    prompt_lengths = torch.tensor([data.draw(st.integers(0, int(n))) for n in lengths])
    offsets = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=b, max_size=b)))
    codes = torch.full_like(full, -1)
    for r in range(b):
        codes[r, :, : prompt_lengths[r]] = full[r, :, : prompt_lengths[r]]
    seen, patterns = step_through(codes, full, d, offsets, lengths, prompt_lengths)
    for r in range(b):
        assert [col for col, _ in seen[r]][-patterns[r].shape[1] :] == list(range(patterns[r].shape[1]))
        for col, tok in seen[r]:
            assert torch.equal(tok, patterns[r][:, col])
        assert torch.equal(codes[r, :, : lengths[r]], full[r, :, : lengths[r]])


# ------------------------------------------------------------------------------------------------ opcheck


def _opcheck_samples():
    mono, stereo = torch.tensor(MONO), torch.tensor(STEREO)
    codes = random_codes((2, 4, 6), 0)
    codes8 = random_codes((1, 8, 1), 1)
    return {
        "delay_scatter": [(codes, mono, SPECIAL), (codes8, stereo, 5), (random_codes((3, 1, 0), 2), torch.tensor([0]), 1)],
        "delay_gather": [(random_codes((2, 4, 10), 3), mono), (random_codes((1, 8, 5), 4), stereo)],
        "delay_step_input": [
            (codes, torch.tensor([3, 9]), torch.tensor([6, 2]), mono, SPECIAL),
            (codes8, torch.tensor([0]), torch.tensor([1]), stereo, 7),
        ],
        "delay_step_write": [
            (codes.clone(), random_codes((2, 4), 5), torch.tensor([3, 4]), torch.tensor([6, 5]), torch.tensor([1, 0]), mono),
            (codes8.clone(), random_codes((1, 8), 6), torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), stereo),
        ],
    }


@pytest.mark.parametrize("name", ["delay_scatter", "delay_gather", "delay_step_input", "delay_step_write"])
def test_opcheck(name):
    op = getattr(torch.ops.enginepy, name).default
    for args in _opcheck_samples()[name]:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, results


def test_fake_kernels_trace_under_torch_compile():
    """fullgraph compile through the fake kernels: the data-dependent pattern length and the in-place write."""

    def decode_two_steps(codes, pat_codes, step, lengths, prompt_lengths, delays):
        pat = torch.ops.enginepy.delay_scatter(pat_codes, delays, SPECIAL)
        for _ in range(2):
            tokens = torch.ops.enginepy.delay_step_input(codes, step, lengths, delays, SPECIAL)
            torch.ops.enginepy.delay_step_write(codes, tokens + 1, step, lengths, prompt_lengths, delays)
            step = step + 1
        return pat

    d = torch.tensor(MONO)
    codes = random_codes((2, 4, 8), 0)
    step, lengths, prompt_lengths = torch.tensor([4, 5]), torch.tensor([8, 6]), torch.tensor([1, 2])
    want_codes = codes.clone()
    want = decode_two_steps(want_codes, codes[:, :, :5], step, lengths, prompt_lengths, d)
    compiled = torch.compile(decode_two_steps, backend="aot_eager", fullgraph=True)
    got_codes = codes.clone()
    got = compiled(got_codes, codes[:, :, :5], step, lengths, prompt_lengths, d)
    assert torch.equal(got, want)
    assert torch.equal(got_codes, want_codes)
    assert not torch.equal(got_codes, codes), "the steps must have written something"


# ---------------------------------------------------------------------------------------------- bad input
# Each bad call runs in a child process (tests/isolated.py): a build whose error path crashes (a SIGSEGV while
# formatting the message, seen in a CUDA build) fails these tests one by one instead of killing the test run.


def _valid(**overrides) -> dict:
    v = {
        "codes": random_codes((2, 4, 5), 0),
        "delays": torch.tensor(MONO),
        "step": torch.tensor([1, 2]),
        "lengths": torch.tensor([5, 5]),
        "prompt_lengths": torch.tensor([0, 0]),
        "tokens": random_codes((2, 4), 1),
    }
    v.update(overrides)
    return v


def _call(op: str, v: dict):
    if op == "scatter":
        return delay_ops.delay_scatter(v["codes"], v["delays"], SPECIAL)
    if op == "gather":
        return delay_ops.delay_gather(v["codes"], v["delays"])
    if op == "input":
        return delay_ops.delay_step_input(v["codes"], v["step"], v["lengths"], v["delays"], SPECIAL)
    return delay_ops.delay_step_write(v["codes"], v["tokens"], v["step"], v["lengths"], v["prompt_lengths"], v["delays"])


BAD_INPUTS = [
    # (ops, argument, bad value as source text, message)
    (["scatter", "input", "write"], "codes", "random_codes((2, 4, 5), 0).float()", "codes must be int64, got Float"),
    (["gather"], "codes", "random_codes((2, 4, 5), 0).int()", "pattern must be int64, got Int"),
    (["scatter", "gather", "input", "write"], "delays", "torch.tensor(MONO, dtype=torch.int32)", "delays must be int64"),
    (["scatter", "input", "write"], "codes", "random_codes((4, 5), 0)",
     r"codes must be 3-D \[B, K, T(max)?\], got 2-D with shape \[4, 5\]"),
    (["gather"], "codes", "random_codes((1, 2, 4, 5), 0)", r"pattern must be 3-D \[B, K, S\], got 4-D with shape \[1, 2, 4, 5\]"),
    (["scatter", "gather", "input", "write"], "delays", "torch.tensor([MONO])", r"delays must be 1-D \[K\], got 2-D with shape \[1, 4\]"),
    (["scatter", "gather", "input", "write"], "delays", "torch.tensor([0, 1, -1, 2])", r"delays must be >= 0, got delays\[2\] = -1"),
    (["scatter", "input", "write"], "delays", "torch.tensor([0, 1, 2])", "delays has 3 entries but codes has 4 codebooks"),
    (["gather"], "delays", "torch.tensor([0, 1, 2, 3, 4])", "delays has 5 entries but pattern has 4 codebooks"),
    (["input", "write"], "step", "torch.tensor([1, 2, 3])", "step has 3 entries but codes has B = 2 rows"),
    (["input", "write"], "step", "torch.tensor([1.0, 2.0])", "step must be int64, got Float"),
    (["input", "write"], "lengths", "torch.tensor([5])", "lengths has 1 entries but codes has B = 2 rows"),
    (["input", "write"], "lengths", "torch.tensor([[5, 5]])", r"lengths must be 1-D \[B\], got 2-D with shape \[1, 2\]"),
    (["write"], "prompt_lengths", "torch.tensor([0, 0, 0])", "prompt_lengths has 3 entries but codes has B = 2 rows"),
    (["write"], "tokens", "random_codes((2, 3), 1)", r"tokens must have shape \[B, K\] = \[2, 4\], got \[2, 3\]"),
    (["write"], "tokens", "random_codes((2, 4), 1).float()", "tokens must be int64, got Float"),
]
SHORT_PATTERN = "delay_ops.delay_gather(random_codes((1, 4, 3), 0), torch.tensor(MONO))"
# (snippet, message): CUDA codes with a CPU tensor beside them, and negative delays copied to the host.
CUDA_BAD_INPUTS = {
    "cuda-delays-on-cpu": ("delay_ops.delay_scatter(random_codes((2, 4, 5), 0, 'cuda'), torch.tensor(MONO), SPECIAL)",
                           r"delays must be on the same device as codes \(cuda:0\), got cpu"),
    "cuda-step-on-cpu": ("delay_ops.delay_step_input(random_codes((2, 4, 5), 0, 'cuda'), torch.tensor([1, 2]), "
                         "torch.tensor([5, 5], device='cuda'), torch.tensor(MONO, device='cuda'), SPECIAL)",
                         r"step must be on the same device as codes \(cuda:0\), got cpu"),
    "cuda-negative-delays": ("delay_ops.delay_scatter(random_codes((2, 4, 5), 0, 'cuda'), "
                             "torch.tensor([0, -1, 2, 3], device='cuda'), SPECIAL)", r"delays must be >= 0, got delays\[1\] = -1"),
}


def _bad_input_name(op: str, arg: str, message: str) -> str:
    return f"{op}/{arg}/{message}"


@pytest.fixture(scope="module")
def bad_input_outcomes():
    snippets = {_bad_input_name(op, arg, message): f"_call({op!r}, _valid({arg}={value}))"
                for ops, arg, value, message in BAD_INPUTS for op in ops}
    snippets["short-pattern"] = SHORT_PATTERN
    if torch.cuda.is_available():
        snippets.update({name: code for name, (code, _) in CUDA_BAD_INPUTS.items()})
    prelude = "from test_delay_ops import _call, _valid, random_codes, delay_ops, torch, MONO, SPECIAL"
    return run_isolated(snippets, prelude)


@pytest.mark.parametrize("ops,arg,value,message", BAD_INPUTS, ids=[m for *_, m in BAD_INPUTS])
def test_bad_input_names_the_argument(bad_input_outcomes, ops, arg, value, message):
    for op in ops:
        bad_input_outcomes[_bad_input_name(op, arg, message)].expect_raises("RuntimeError", message)


def test_gather_refuses_a_pattern_shorter_than_the_delays(bad_input_outcomes):
    bad_input_outcomes["short-pattern"].expect_raises(
        "RuntimeError", r"pattern has S = 3 steps but delays need at least max\(delays\) \+ 1 = 4")


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CUDA_BAD_INPUTS))
def test_cuda_device_mismatch_and_negative_delays_are_refused(bad_input_outcomes, name):
    bad_input_outcomes[name].expect_raises("RuntimeError", CUDA_BAD_INPUTS[name][1])


def test_a_crashing_call_fails_only_its_own_test():
    """The isolation itself: a SIGSEGV in one snippet is reported for that snippet, and the next still runs."""
    outcomes = run_isolated({
        "crash": "import ctypes; ctypes.string_at(0)",
        "after": "raise RuntimeError('still running')",
    })
    assert outcomes["crash"].status == "crashed" and "SIGSEGV" in outcomes["crash"].detail
    outcomes["after"].expect_raises("RuntimeError", "still running")


def test_missing_extension_says_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "enginepy._C", None)
    monkeypatch.delitem(sys.modules, "enginepy.delay_ops")
    monkeypatch.delattr(enginepy, "_C")
    monkeypatch.delattr(enginepy, "delay_ops")
    with pytest.raises(ImportError, match=r"make build.*pip install --no-build-isolation --no-deps -e \."):
        importlib.import_module("enginepy.delay_ops")


# ------------------------------------------------------------------------------------------ strided inputs


def test_strided_inputs_and_in_place_write_into_a_view():
    d_base = torch.tensor([0, 9, 1, 9, 2, 9, 3, 9])
    d = d_base[::2]  # [0, 1, 2, 3], stride 2
    base = random_codes((3, 10, 4), 0)
    codes = base.permute(0, 2, 1)[:, :, ::2]  # [3, 4, 5], non-contiguous
    assert not codes.is_contiguous() and not d.is_contiguous()
    dense = codes.contiguous()
    assert torch.equal(delay_ops.delay_scatter(codes, d, SPECIAL), pattern.delay_scatter(dense, d.contiguous(), SPECIAL))
    pat = delay_ops.delay_scatter(dense, d.contiguous(), SPECIAL)
    pat_view = torch.cat([pat, pat], dim=2)[:, :, : pat.shape[2]]
    assert torch.equal(delay_ops.delay_gather(pat_view.transpose(0, 1).contiguous().transpose(0, 1), d), dense)

    step = torch.tensor([3, 0, 4, 0, 7, 0])[::2]
    lengths = torch.tensor([5, 0, 2, 0, 5, 0])[::2]
    prompt_lengths = torch.tensor([0, 0, 1, 0, 2, 0])[::2]
    assert torch.equal(
        delay_ops.delay_step_input(codes, step, lengths, d, SPECIAL),
        pattern.delay_step_input(dense, step.contiguous(), lengths.contiguous(), d.contiguous(), SPECIAL),
    )
    tokens = random_codes((4, 3), 1).t()  # [3, 4], non-contiguous
    want = dense.clone()
    pattern.delay_step_write(want, tokens, step, lengths, prompt_lengths, d)
    base_before = base.clone()
    delay_ops.delay_step_write(codes, tokens, step, lengths, prompt_lengths, d)
    assert torch.equal(codes, want)
    assert not torch.equal(base, base_before), "the write must land in the viewed storage"
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched.permute(0, 2, 1)[:, :, ::2] = False
    assert torch.equal(base[untouched], base_before[untouched])


# ------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("delays", FIXED_DELAYS)
@pytest.mark.parametrize("b,t", [(1, 0), (1, 1), (3, 40), (2, 1503)])
def test_cuda_scatter_gather_match_oracle(delays, b, t):
    d = torch.tensor(delays, device="cuda")
    codes = random_codes((b, len(delays), t), seed=t, device="cuda")
    got = delay_ops.delay_scatter(codes, d, SPECIAL)
    assert got.is_cuda
    assert torch.equal(got.cpu(), pattern.delay_scatter(codes.cpu(), d.cpu(), SPECIAL))
    assert torch.equal(delay_ops.delay_gather(got, d), codes)
    arbitrary = random_codes(got.shape, seed=1, device="cuda")
    assert torch.equal(delay_ops.delay_gather(arbitrary, d).cpu(), pattern.delay_gather(arbitrary.cpu(), d.cpu()))
    strided = codes.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(delay_ops.delay_scatter(strided, d, SPECIAL), got)


@pytest.mark.cuda
@settings(max_examples=40, deadline=None)
@given(delays=delay_lists(), b=st.integers(1, 5), t_max=st.integers(0, 40), data=st.data())
def test_cuda_step_ops_match_oracle(delays, b, t_max, data):
    d = torch.tensor(delays)
    k = len(delays)
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, t_max), min_size=b, max_size=b)))
    prompt_lengths = torch.tensor([data.draw(st.integers(0, int(n))) for n in lengths])
    step = torch.tensor(data.draw(st.lists(st.integers(0, t_max + 7), min_size=b, max_size=b)))
    codes = random_codes((b, k, t_max), data.draw(st.integers(0, 2**31 - 1)))
    tokens = random_codes((b, k), 1)
    cuda = [x.cuda() for x in (codes, step, lengths, prompt_lengths, d, tokens)]
    c_codes, c_step, c_lengths, c_prompt, c_d, c_tokens = cuda
    got = delay_ops.delay_step_input(c_codes, c_step, c_lengths, c_d, SPECIAL)
    assert torch.equal(got.cpu(), pattern.delay_step_input(codes, step, lengths, d, SPECIAL))
    want = codes.clone()
    pattern.delay_step_write(want, tokens, step, lengths, prompt_lengths, d)
    view = c_codes.transpose(0, 2).contiguous().transpose(0, 2)  # strided [B, K, Tmax]
    delay_ops.delay_step_write(view, c_tokens, c_step, c_lengths, c_prompt, c_d)
    assert torch.equal(view.cpu(), want)


@pytest.mark.cuda
def test_cuda_step_ops_do_not_synchronise_and_replay_in_a_graph():
    d = torch.tensor(STEREO, device="cuda")
    b, k, t_max = 3, 8, 12
    full = random_codes((b, k, t_max), 0, device="cuda")
    lengths = torch.tensor([12, 7, 3], device="cuda")
    prompt_lengths = torch.tensor([0, 2, 1], device="cuda")
    pat = delay_ops.delay_scatter(full, d, SPECIAL)  # [B, K, S], rows padded to Tmax
    codes = torch.full_like(full, -1)
    for r in range(b):
        codes[r, :, : prompt_lengths[r]] = full[r, :, : prompt_lengths[r]]
    step = torch.zeros(b, dtype=torch.int64, device="cuda")
    predicted = torch.empty((b, k), dtype=torch.int64, device="cuda")

    torch.cuda.set_sync_debug_mode("error")
    try:
        delay_ops.delay_step_input(codes, step, lengths, d, SPECIAL)
        delay_ops.delay_step_write(codes.clone(), predicted, step, lengths, prompt_lengths, d)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        delay_ops.delay_step_input(codes, step, lengths, d, SPECIAL)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = delay_ops.delay_step_input(codes, step, lengths, d, SPECIAL)
        delay_ops.delay_step_write(codes, predicted, step, lengths, prompt_lengths, d)
    for s in range(pat.shape[2] - 1):
        step.fill_(s)
        predicted.copy_(pat[:, :, s + 1])
        graph.replay()
        for r in range(b):
            row_pat = pattern.delay_scatter(full[r : r + 1, :, : int(lengths[r])].cpu(), d.cpu(), SPECIAL)[0]
            if s < row_pat.shape[1]:
                assert torch.equal(tokens[r].cpu(), row_pat[:, s]), (r, s)
    for r in range(b):
        n = int(lengths[r])
        assert torch.equal(codes[r, :, :n], full[r, :, :n])
        assert bool((codes[r, :, n:] == -1).all())


@pytest.mark.cuda
def test_cuda_opcheck():
    for name, samples in _opcheck_samples().items():
        op = getattr(torch.ops.enginepy, name).default
        for args in samples:
            cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
            results = torch.library.opcheck(op, cuda_args)
            assert set(results.values()) == {"SUCCESS"}, (name, results)
