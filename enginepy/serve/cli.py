"""The `serve` command: `add_parser(subparsers)` adds it to a CLI, `run(args)` runs it; `main()` stands alone
(`python -m enginepy.serve`). Nothing heavy is imported before `run`, so that building the CLI costs nothing;
enginepy.cli is imported inside functions (it imports this module to add the command)."""
from __future__ import annotations

import argparse
import os
import socket

from . import MAX_BODY_BYTES

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_WAITING = 64


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import _model_args  # --model, --backend, --device, --dtype, --max-duration, --max-text-len, as `generate`

    _model_args(p)
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help=f"requests decoded together (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                   help=f"requests queued beyond those; more get 503 (default {DEFAULT_MAX_WAITING})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help=f"largest request body accepted; larger ones get 413 (default {MAX_BODY_BYTES})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (default info)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object (the `enginepy` CLI's)."""
    p = subparsers.add_parser("serve", help="serve the model over HTTP (POST /v1/audio/generations)",
                              description="HTTP server: POST /v1/audio/generations, GET /health, /v1/models, "
                                          "/metrics, /docs.")
    add_arguments(p)
    return p


def check_args(args) -> None:
    """Everything that can be refused before loading the model."""
    from ..api import BACKENDS
    from ..conditioning import check_max_text_len
    from ..convert import parse_dtype
    from ..errors import InvalidParameter
    from ..loading import parse_device

    if args.backend is not None and args.backend not in BACKENDS:
        raise InvalidParameter(f"--backend must be one of {', '.join(BACKENDS)}; got {args.backend!r}")
    parse_device(args.device)
    if args.dtype is not None:
        parse_dtype(args.dtype, "--dtype")
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--max-waiting", args.max_waiting, 0),
                             ("--max-body-bytes", args.max_body_bytes, 1)):
        if value < low:
            raise InvalidParameter(f"{name} must be an integer >= {low}; got {value}")
    if not 0 < args.max_duration < float("inf"):
        raise InvalidParameter(f"--max-duration must be a positive number of seconds; got {args.max_duration}")
    try:
        check_max_text_len(args.max_text_len)
    except InvalidParameter:
        raise InvalidParameter(f"--max-text-len must be an integer in [1, 512]; got {args.max_text_len}") from None
    if not 0 <= args.port <= 65535:
        raise InvalidParameter(f"--port must be in [0, 65535]; got {args.port}")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), IPv6 when host is an IPv6 address."""
    from ..errors import InvalidParameter

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InvalidParameter(f"--host {host!r} cannot be resolved ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InvalidParameter(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") from None
    # Listening before uvicorn starts: a client that connects early waits in the backlog instead of being refused.
    sock.listen(2048)
    return sock


def serve_app(app, host: str, port: int, log_level: str = "info") -> None:
    """Run `app` with uvicorn on host:port until SIGINT/SIGTERM; prints `listening on http://HOST:PORT` (the
    real port when 0 was asked) once clients can connect."""
    import uvicorn

    sock = bind(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    print(f"enginepy serve: listening on http://{shown}:{bound[1]}", flush=True)
    # timeout_graceful_shutdown: on Ctrl-C, streams in flight get this long before they are cut.
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, access_log=log_level == "debug")
    uvicorn.Server(config).run(sockets=[sock])


def run(args) -> int:
    """`enginepy serve`: load the model, build the app, serve until interrupted."""
    check_args(args)
    from ..api import MusicGen
    from .app import create_app

    given = {name: value for name, value in (("dtype", args.dtype), ("backend", args.backend)) if value is not None}
    # max_batch=1: with the fast backend, from_pretrained builds an engine of that size for `generate` (static
    # buffers, KV pool, CUDA graphs) that the server never uses; the server's own engine gets --max-batch.
    mg = MusicGen.from_pretrained(args.model, device=args.device, max_duration=args.max_duration,
                                  max_batch=1, max_text_len=args.max_text_len, **given)
    app = create_app(mg, max_batch=args.max_batch, max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                     model_id=os.path.basename(os.path.normpath(args.model)))
    dtype = str(mg.decoder.dtype).replace("torch.", "")
    print(f"model {args.model} | device {mg.device} | dtype {dtype} | backend {mg.backend} | "
          f"max batch {args.max_batch} | max waiting {args.max_waiting}", flush=True)
    serve_app(app, args.host, args.port, args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m enginepy.serve [options]`, as `enginepy serve`: refusals in one line with exit code 2; after a
    graceful shutdown, exit 130 on Ctrl-C and 143 on SIGTERM."""
    from ..cli import _Parser, run_command

    parser = _Parser(prog="enginepy serve", description="HTTP server over the step engine.")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again: it ends there as Terminated.
    return run_command("enginepy serve", run, args)
