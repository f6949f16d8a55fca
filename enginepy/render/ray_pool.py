"""Scale-out of `enginepy render` with Ray Data (optional: `pip install "enginepy[ray]"`).

The jobs still to render become a Ray dataset; `map_batches` hands batches of them to a pool of actors, each of
which loads the model once and renders its batches through its own step engine (`worker.Renderer`), writing the
audio files itself and returning their manifest lines; the driver writes the manifest. One actor per GPU
(num_gpus=1) with --device cuda, or actors of --actor-cpus cores on CPU. Every job carries its own seed and a
request's codes do not depend on its batch neighbours, so the files are byte-identical to a single-process run.
On a cluster, --out must be a directory every node sees (a shared file system), --model a path (or hub id)
every node can load, and the jobs' melody / continue files (absolute paths once the job file is read) paths every
node can read: an actor reads them itself and checks their content against the hash taken when the job file was
read, so a node seeing other content fails the job instead of rendering something else.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Iterator

from ..errors import EnginepyError, InvalidParameter
from .jobs import Job
from .outdir import OutputKey

# Jobs per map_batches call, as a multiple of the engine's slots: an actor's engine drains at the end of each
# batch, so longer batches waste less of the tail, while shorter ones return manifest lines to the driver sooner.
BATCH_SLOTS = 4


class RenderFailed(EnginepyError, RuntimeError):
    """A Ray actor failed (the model would not load there, a worker died); the message says what Ray reported."""


def check_ray_installed() -> None:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None:
        raise InvalidParameter('--ray needs Ray Data, which is not installed: pip install "enginepy[ray]"')


class RenderActor:
    """A Ray Data callable class: loads the model once, then renders each batch of jobs (a column "job" of
    Job.to_json strings) and returns their manifest lines (a column "entry" of JSON strings)."""

    def __init__(self, model: str, device: str, dtype: str, backend: str | None, max_duration: float,
                 max_text_len: int, max_batch: int, out_dir: str, key: OutputKey, threads: int | None):
        import torch

        from ..api import MusicGen
        from .worker import Renderer

        if threads is not None:
            torch.set_num_threads(threads)  # the cores Ray reserved for this actor, not every core of the node
        mg = MusicGen.from_pretrained(model, device=device, dtype=dtype, backend=backend, max_duration=max_duration,
                                      max_batch=max_batch, max_text_len=max_text_len)
        self.renderer = Renderer(mg, out_dir, key, max_batch)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        jobs = [Job.from_json(text) for text in batch["job"]]
        entries = [json.dumps(entry) for entry in self.renderer.render(jobs)]
        return {"entry": np.array(entries, dtype=object)}


def render_with_ray(jobs: list[Job], *, address: str, actors: int | None, actor_cpus: int | None, model: str,
                    device: str, dtype: str, backend: str | None, max_duration: float, max_text_len: int,
                    max_batch: int, out_dir: str, key: OutputKey) -> Iterator[dict]:
    """Yield the manifest line of every job (in the order batches complete). Joins the Ray instance this process
    already started, else ray.init(address) ('' = RAY_ADDRESS or a new local instance); shuts down only an
    instance it started itself. model and out_dir must be absolute paths: Ray workers do not run in this
    process's working directory."""
    import ray
    import ray.data

    started = not ray.is_initialized()
    if started:
        ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING)
    try:
        cuda = device.startswith("cuda")
        resources = ray.cluster_resources()
        if actors is None:
            actors = int(resources.get("GPU", 0)) if cuda else 1
            if actors < 1:
                raise InvalidParameter("--device cuda with --ray: the Ray cluster has no GPUs; use --device cpu")
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines would bury ours
        ray.data.DataContext.get_current().enable_progress_bars = False  # the command draws its own bar of jobs
        batch_size = max(1, min(BATCH_SLOTS * max_batch, math.ceil(len(jobs) / actors)))
        batches = math.ceil(len(jobs) / batch_size)
        actors = min(actors, batches)  # an actor without a batch would load the model for nothing
        if cuda:
            remote = {"num_gpus": 1, "num_cpus": actor_cpus or 1}
            threads = None
        else:
            # An even share of the cluster's cores, at most one machine's worth (an actor runs on one machine).
            largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=1)
            cpus = actor_cpus or max(1, min(int(resources.get("CPU", 1)) // actors, int(largest)))
            remote = {"num_cpus": cpus}
            threads = cpus
        # One block per batch: the actor pool gets as many tasks as there are batches to spread over its actors.
        dataset = ray.data.from_items([{"job": job.to_json()} for job in jobs], override_num_blocks=batches)
        results = dataset.map_batches(
            RenderActor, batch_size=batch_size,
            # One batch at a time per actor: a free actor takes the next batch instead of a busy one queueing it.
            compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs=dict(model=model, device="cuda" if cuda else "cpu", dtype=dtype, backend=backend,
                                       max_duration=max_duration, max_text_len=max_text_len, max_batch=max_batch,
                                       out_dir=out_dir, key=key, threads=threads),
            **remote,
        )
        try:
            for row in results.iter_rows():
                yield json.loads(row["entry"])
        except ray.exceptions.RayError as e:
            cause = str(e).strip().splitlines()
            raise RenderFailed(f"Ray: {cause[-1] if cause else type(e).__name__}") from None
    finally:
        if started:
            ray.shutdown()
