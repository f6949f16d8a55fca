"""Bulk rendering: a job file (JSONL, CSV or text) -> DIR/<id>.wav + DIR/manifest.jsonl, on the step engine,
resumable after any interruption, optionally on a Ray Data actor pool (`--ray`). See `command` for the CLI,
`jobs` for the job file, `outdir` for the directory and its manifest, `worker` for the engine loop and
`ray_pool` for scale-out."""
from .command import add_parser, main, run

__all__ = ["add_parser", "main", "run"]
