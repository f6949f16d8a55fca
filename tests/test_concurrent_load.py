"""Several processes loading the same Hugging Face directory into one empty cache at once.

Each round changes the source's mtime (a new fingerprint: a new conversion), then releases every process
at the same moment, so that all of them find no converted copy and race to make it. Conversion is
serialised by the cache's lock: exactly one copy per round is made, nobody reads a directory that is being
replaced, and no temporary directory is left behind.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import threading

import torch
from safetensors.torch import load_file

PROCESSES = 3
ROUNDS = 2
LOADS = 3  # per process and round: the first may convert, the others read while slower processes convert


def _worker(index: int, hf_dir: str, cache: str, barrier, results) -> None:
    from enginepy.loading import load_components, resolve_model_dir

    weights = os.path.join(hf_dir, "model.safetensors")
    for r in range(ROUNDS):
        barrier.wait()
        if index == 0:
            stamp = 1_700_000_000 + r
            os.utime(weights, (stamp, stamp))
        barrier.wait()
        for _ in range(LOADS):
            try:
                directory = resolve_model_dir(hf_dir, "float32", cache)
                cfg, decoder, conditioner, codec = load_components(directory, torch.float32, torch.device("cpu"))
                # The inode of enginepy.json tells one conversion from another of the same content.
                inode = os.stat(os.path.join(directory, "enginepy.json")).st_ino
                results.put((index, r, "ok", directory, (inode, float(decoder.w("emb").double().sum()))))
            except Exception as e:  # the failure is the result: reported, not raised in a child
                results.put((index, r, f"{type(e).__name__}: {e}", None, None))


def test_concurrent_first_loads_share_one_conversion(tiny_hf, tmp_path):
    hf_dir = shutil.copytree(tiny_hf, tmp_path / "hf")
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, str(hf_dir), cache, barrier, results)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=300) for _ in range(PROCESSES * ROUNDS * LOADS)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    failures = [o for o in outcomes if o[2] != "ok"]
    assert failures == []
    # One converted copy per round, shared by every process of that round, and nothing else in the cache.
    by_round = {r: {o[3] for o in outcomes if o[1] == r} for r in range(ROUNDS)}
    assert all(len(dirs) == 1 for dirs in by_round.values())
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(d.pop()) for d in by_round.values())
    reference = load_file(os.path.join(tiny_hf, "model.safetensors"))["decoder.model.decoder.embed_tokens.0.weight"]
    for directory in {o[3] for o in outcomes}:
        emb = load_file(os.path.join(directory, "decoder.safetensors"))["emb"]
        assert torch.equal(emb[0], reference)
    assert len({o[4][1] for o in outcomes}) == 1  # every process loaded the same weights
    for r in range(ROUNDS):  # ... from a single conversion per round, never replaced under a reader
        assert len({o[4][0] for o in outcomes if o[1] == r}) == 1


def test_a_waiting_process_reuses_the_conversion_it_waited_for(tiny_hf, tmp_path):
    """Deterministic half of the above: while the cache is locked (a conversion under way), a load waits
    without starting its own; once the lock is released it uses the finished copy instead of converting again."""
    from enginepy.convert import _convert_locked, directory_lock, source_fingerprint
    from enginepy.loading import resolve_model_dir

    cache = tmp_path / "cache"
    cache.mkdir()
    target = str(cache / source_fingerprint(tiny_hf, "float32"))
    got: list[str] = []
    with directory_lock(str(cache)):
        waiter = threading.Thread(target=lambda: got.append(resolve_model_dir(tiny_hf, "float32", str(cache))))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive() and os.listdir(cache) == []  # waiting, not converting
        _convert_locked(tiny_hf, target, torch.float32, str(cache))
        inode = os.stat(os.path.join(target, "enginepy.json")).st_ino
    waiter.join(timeout=60)
    assert got == [target]
    assert os.stat(os.path.join(target, "enginepy.json")).st_ino == inode
    assert os.listdir(cache) == [os.path.basename(target)]
