"""The step engine: continuous batching with requests joining and leaving at any step, on both backends.

The invariant under test: a request's codes are the same whatever else runs and whenever it joins, i.e.
equal to `generate_tokens([prompt])` with the same seed and settings (which tests/test_parity.py and
tests/test_fast.py check against transformers).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enginepy import InvalidParameter, MusicGen
from enginepy.engine import EngineFull
from conftest import HAS_CUDA

# (prompt, duration s, seed, settings, step at which it is added)
CHURN = [
    ("lo-fi beat with warm piano", 0.16, 11, dict(top_k=8), 0),
    ("jazz", 0.08, 12, dict(use_sampling=False), 0),
    ("dark techno with deep bass", 0.2, 13, dict(top_p=0.7, cfg_coef=1.0), 2),
    ("ambient pads", 0.1, 14, dict(temperature=0.6, top_k=0, cfg_coef=1.0), 3),
    ("drum and bass", 0.12, 15, dict(use_sampling=False, cfg_coef=1.0), 5),
    ("folk guitar", 0.06, 16, dict(top_k=3, temperature=1.5, cfg_coef=5.0), 9),
]


def alone(mg: MusicGen, prompt, duration, seed, kwargs) -> torch.Tensor:
    mg.set_generation_params(duration=duration, seed=seed, **kwargs)
    return mg.generate_tokens([prompt])[0]


def run_churn(engine, requests, abort: dict[int, str] | None = None):
    """Adds each request at its step, aborts per `abort` (step -> id); returns id -> (codes, streamed frames)."""
    abort = abort or {}
    finished, streamed = {}, {}
    step = 0
    pending = sorted(enumerate(requests), key=lambda x: x[1][4])
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][4] <= step:
            i, (prompt, duration, seed, kwargs, _) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, duration=duration, seed=seed, **kwargs)
        if step in abort:
            assert engine.abort_request(abort[step])
        for out in engine.step():
            assert out.error is None
            streamed.setdefault(out.request_id, []).append(out.new_frames)
            if out.finished:
                finished[out.request_id] = out.codes
        step += 1
        assert step < 500
    return finished, {k: torch.cat(v, dim=1) for k, v in streamed.items()}


def check_churn(mg, engine):
    finished, streamed = run_churn(engine, CHURN)
    assert sorted(finished) == [f"r{i}" for i in range(len(CHURN))]
    for i, (prompt, duration, seed, kwargs, _) in enumerate(CHURN):
        expected = alone(mg, prompt, duration, seed, kwargs)
        assert torch.equal(finished[f"r{i}"], expected), f"request {i} changed by its neighbours"
        assert torch.equal(streamed[f"r{i}"], expected)  # new_frames, concatenated, are the codes


def test_requests_joining_at_any_step_equal_running_alone(tiny_engine):
    check_churn(tiny_engine, tiny_engine.engine(max_batch=3))


@pytest.fixture(scope="module")
def fast_mg(tiny_hf, engine_cache):
    if not HAS_CUDA:
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("needs CUDA or TRITON_INTERPRET=1 exported before import")
    return MusicGen.from_pretrained(tiny_hf, device="cuda" if HAS_CUDA else "cpu", dtype="float32",
                                    cache_dir=engine_cache, backend="fast", max_batch=3, max_duration=0.4)


@pytest.mark.triton
def test_fast_requests_joining_at_any_step_equal_running_alone(fast_mg, tiny_engine):
    engine = fast_mg.engine(max_batch=3)
    check_churn(fast_mg, engine)
    # and the fast backend's codes are the reference's
    for prompt, duration, seed, kwargs, _ in CHURN[:3]:
        assert torch.equal(alone(fast_mg, prompt, duration, seed, kwargs), alone(tiny_engine, prompt, duration, seed, kwargs))
    runner = engine.runner
    assert engine.num_free_blocks == runner.cache.allocator.num_blocks  # every block came back
    assert runner.text.allocator.num_free == runner.text.allocator.num_blocks


@pytest.mark.triton
def test_fast_abort_frees_slot_and_blocks_at_once_and_spares_the_others(fast_mg):
    engine = fast_mg.engine(max_batch=2)
    total = engine.num_free_blocks
    engine.add_request("a", "jazz", duration=0.2, seed=1, top_k=8)
    engine.add_request("b", "lo-fi beat", duration=0.2, seed=2, use_sampling=False)
    engine.add_request("c", "techno", duration=0.1, seed=3, top_p=0.5)
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 1)
    held = total - engine.num_free_blocks
    assert held > 0
    assert engine.abort_request("b")
    assert engine.num_running == 1 and engine.num_free_blocks > total - held
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.codes
    assert sorted(outs) == ["a", "c"]
    assert torch.equal(outs["a"], alone(fast_mg, "jazz", 0.2, 1, dict(top_k=8)))
    assert torch.equal(outs["c"], alone(fast_mg, "techno", 0.1, 3, dict(top_p=0.5)))
    assert engine.num_free_blocks == total


def test_abort_of_a_running_request_leaves_the_others_unchanged(tiny_engine):
    engine = tiny_engine.engine(max_batch=4)
    finished, _ = run_churn(engine, CHURN[:4], abort={3: "r0"})
    assert sorted(finished) == ["r1", "r2", "r3"]
    for i in (1, 2, 3):
        prompt, duration, seed, kwargs, _ = CHURN[i]
        assert torch.equal(finished[f"r{i}"], alone(tiny_engine, prompt, duration, seed, kwargs))
    assert not engine.abort_request("r0") and not engine.abort_request("never-added")
    assert engine.runner.slots == {} and sorted(engine.free_slots) == [0, 1, 2, 3]


def test_fifo_admission_and_counts(tiny_engine):
    engine = tiny_engine.engine(max_batch=2, max_waiting=2)
    engine.add_request("q0", "jazz", duration=0.08, seed=0)
    engine.add_request("q1", "jazz", duration=0.04, seed=1)
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (2, 0)
    engine.add_request("q2", "jazz", duration=0.02, seed=2)
    engine.add_request("q3", "jazz", duration=0.02, seed=3)
    with pytest.raises(EngineFull, match=r"the engine's waiting queue is full \(2 requests\); retry later"):
        engine.add_request("q4", "jazz", duration=0.02)
    order = []
    while engine.has_unfinished_requests():
        before = set(engine.running)
        engine.step()
        order += [r for r in engine.running if r not in before]
        assert engine.num_running <= 2
    assert order == ["q2", "q3"]  # first come, first served, as slots free up
    assert engine.num_free_blocks is None  # the reference runner has no block pool


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(duration=0), r"duration must be in \(0, 30\] seconds; got 0"),
        (dict(duration=31.0), r"duration must be in \(0, 30\] seconds; got 31.0 \(raise max_duration"),
        (dict(top_k=33), r"top_k must be an integer in \[0, 32\]; got 33"),
        (dict(top_p=1.5), r"top_p must be in \[0, 1\]; got 1.5"),
        (dict(temperature=-0.5), r"temperature must be >= 0 \(0 means greedy\); got -0.5"),
        (dict(cfg_coef=-1), "cfg_coef must be >= 0; got -1"),
        (dict(use_sampling="yes"), "use_sampling must be True or False"),
        (dict(seed=-3), r"seed must be None or an integer in \[0, 2\*\*63 - 1\]; got -3"),
    ],
)
def test_add_request_validates_like_set_generation_params(tiny_engine, kwargs, match):
    engine = tiny_engine.engine(max_batch=1)
    with pytest.raises(InvalidParameter, match=match):
        engine.add_request("r", "jazz", **kwargs)
    with pytest.raises(InvalidParameter, match=match):
        tiny_engine.set_generation_params(**kwargs)
    assert not engine.has_unfinished_requests()


def test_bad_ids_prompts_and_limits_are_refused(tiny_engine):
    engine = tiny_engine.engine(max_batch=1)
    engine.add_request("r", "jazz", duration=0.02)
    with pytest.raises(InvalidParameter, match="request_id 'r' is already in the engine"):
        engine.add_request("r", "rock", duration=0.02)
    with pytest.raises(InvalidParameter, match="request_id must be a non-empty string; got ''"):
        engine.add_request("", "rock")
    with pytest.raises(InvalidParameter, match="prompt must be a string; got int"):
        engine.add_request("s", 5)
    with pytest.raises(InvalidParameter, match="max_batch must be a positive integer; got 0"):
        tiny_engine.engine(max_batch=0)
    with pytest.raises(InvalidParameter, match="max_waiting must be None or an integer >= 0; got -1"):
        tiny_engine.engine(max_batch=1, max_waiting=-1)


def test_random_seed_is_reported_and_reproduces(tiny_engine):
    engine = tiny_engine.engine(max_batch=2)
    req = engine.add_request("r", "jazz", duration=0.06, top_k=5)
    codes = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.seed == req.seed
            codes = out.codes if out.finished else codes
    assert torch.equal(codes, alone(tiny_engine, "jazz", 0.06, req.seed, dict(top_k=5)))


@pytest.mark.triton
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.tuples(st.sampled_from(["add", "abort", "step", "step", "step"]), st.integers(0, 7),
                                 st.sampled_from([0.02, 0.04, 0.1]), st.booleans()), min_size=20, max_size=120))
def test_no_kv_block_leaks_under_random_add_abort_finish(fast_mg, events):
    """Thousands of events over the examples; the decode math is skipped (its bookkeeping is what could leak)."""
    engine = fast_mg.engine(max_batch=3, max_waiting=4)
    runner = engine.runner
    runner._step = lambda rows: None
    total, text_total = runner.cache.allocator.num_blocks, runner.text.allocator.num_blocks
    for kind, n, duration, cfg in events:
        rid = f"r{n}"
        if kind == "add" and rid not in engine.requests:
            try:
                engine.add_request(rid, "jazz" * (1 + n), duration=duration, cfg_coef=3.0 if cfg else 1.0)
            except EngineFull:
                pass
        elif kind == "abort":
            engine.abort_request(rid)
        else:
            engine.step()
        in_use = sum(len(b) for b in runner.row_blocks.values())
        assert runner.cache.allocator.num_free + in_use == total
        assert engine.num_free_blocks >= 0
        assert len(runner.free_rows) + sum(len(r) for r in runner.slot_rows.values()) == runner.max_rows
    for rid in list(engine.requests):
        engine.abort_request(rid)
    assert runner.cache.allocator.num_free == total and engine.num_free_blocks == total
    assert runner.text.allocator.num_free == text_total
    assert (runner.positions == -1).all() and (runner.cache.block_tables == 0).all()


@pytest.mark.cuda
def test_one_graph_per_padded_row_count(fast_mg):
    engine = fast_mg.engine(max_batch=3)
    assert sorted(engine.runner.graphs) == [1, 2, 4, 6]
    check_churn(fast_mg, engine)
    assert sorted(engine.runner.graphs) == [1, 2, 4, 6]  # no capture after start-up, whatever the settings


def test_streamed_audio_joins_to_the_one_shot_decode(tiny_engine):
    mg = tiny_engine
    engine = mg.engine(max_batch=2, stream_audio=True)
    finished, audio = {}, {}
    for i, (prompt, duration, seed, kwargs, _) in enumerate(CHURN[:3]):
        engine.add_request(f"r{i}", prompt, duration=duration, seed=seed, **kwargs)
    while engine.has_unfinished_requests():
        for out in engine.step():
            audio.setdefault(out.request_id, []).append(out.new_audio)
            if out.finished:
                finished[out.request_id] = out.codes
    for rid, codes in finished.items():
        joined = torch.cat(audio[rid], dim=-1)
        one_shot = mg.generate_audio(codes[None])[0]
        assert joined.shape == one_shot.shape
        assert (joined - one_shot).abs().max() <= 1e-4


def test_generate_stream_yields_chunks_of_generate(tiny_engine):
    mg = tiny_engine
    mg.set_generation_params(duration=0.3, seed=4, top_k=6)
    chunks = list(mg.generate_stream("lo-fi beat"))
    assert len(chunks) > 2 and all(c.dtype == torch.float32 and c.shape[0] == 1 and c.shape[1] > 0 for c in chunks)
    whole = mg.generate("lo-fi beat")[0]
    joined = torch.cat(chunks, dim=-1)
    assert joined.shape == whole.shape and (joined - whole).abs().max() <= 1e-4
    with pytest.raises(InvalidParameter, match="description must be a string; got list"):
        next(mg.generate_stream(["a", "b"]))
    with pytest.raises(InvalidParameter, match="stream_audio must be True or False; got 1"):
        mg.engine(max_batch=1, stream_audio=1)


def test_too_long_prompt_is_refused_when_added(tiny_engine):
    engine = tiny_engine.engine(max_batch=1)
    with pytest.raises(InvalidParameter, match=r"prompt is \d+ tokens long; the limit is 256"):
        engine.add_request("long", "jazz " * 400, duration=0.02)
    assert not engine.has_unfinished_requests() and "long" not in engine.requests
