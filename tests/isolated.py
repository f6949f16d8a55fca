"""Runs snippets of Python in a child process, so that a crash in native code (SIGSEGV, abort) fails the test
whose call crashed instead of ending the whole test run.

    outcomes = run_isolated({"a": "f(1)", "b": "f(-1)"}, prelude="from mod import f")
    outcomes["b"].expect_raises("RuntimeError", r"must be >= 0")

All snippets share one child process (one interpreter start, one import of torch); when a snippet crashes
it, the snippets after it run in a fresh child. Each snippet runs in its own copy of the prelude's namespace.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

# The child writes one JSON line per event to a file (not stdout, which the snippets may print to), flushed
# at once so that the lines written before a crash survive it.
_CHILD = r"""
import faulthandler, json, sys
faulthandler.enable()
sys.path.insert(0, sys.argv[2])
prelude, snippets = json.loads(sys.stdin.read())
log = open(sys.argv[1], "a")

def record(**fields):
    log.write(json.dumps(fields) + "\n")
    log.flush()

namespace = {}
exec(prelude, namespace)
for name, code in snippets:
    record(name=name, event="start")
    try:
        exec(code, dict(namespace))
    except Exception as exc:
        record(name=name, event="raised", type=type(exc).__name__, message=str(exc))
    else:
        record(name=name, event="returned")
"""


@dataclass
class Outcome:
    """What one snippet did: 'returned', 'raised' (error_type, message) or 'crashed' (detail says how)."""

    status: str
    error_type: str = ""
    message: str = ""
    detail: str = ""

    def expect_raises(self, error_type: str, pattern: str) -> None:
        """Fails the calling test unless the snippet raised error_type with a message matching pattern."""
        if self.status == "crashed":
            pytest.fail(f"the call crashed its process instead of raising {error_type}: {self.detail}")
        if self.status == "returned":
            pytest.fail(f"the call returned instead of raising {error_type} matching {pattern!r}")
        assert self.error_type == error_type, f"raised {self.error_type}: {self.message}"
        assert re.search(pattern, self.message), f"{pattern!r} not found in the message: {self.message}"


def _describe_exit(returncode: int | None, stderr: str) -> str:
    if returncode is None:
        how = "timed out"
    elif returncode < 0:
        how = f"killed by {signal.Signals(-returncode).name}"
    else:
        how = f"exit status {returncode}"
    return f"{how}; stderr ends with:\n{stderr[-3000:]}"


def run_isolated(snippets: dict[str, str], prelude: str = "", timeout: float = 600,
                 env: dict[str, str] | None = None) -> dict[str, Outcome]:
    """name -> Outcome for every snippet; `prelude` runs first in each child (imports, helpers)."""
    pending = list(snippets.items())
    outcomes: dict[str, Outcome] = {}
    while pending:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "events.jsonl"
            log.touch()
            try:
                child = subprocess.run([sys.executable, "-c", _CHILD, str(log), str(TESTS)],
                                       input=json.dumps([prelude, pending]), capture_output=True, text=True,
                                       timeout=timeout, env=env if env is not None else dict(os.environ))
                returncode, stderr = child.returncode, child.stderr
            except subprocess.TimeoutExpired as exc:
                returncode = None
                stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            running = None
            for line in log.read_text().splitlines():
                event = json.loads(line)
                if event["event"] == "start":
                    running = event["name"]
                    continue
                running = None
                outcomes[event["name"]] = Outcome(event["event"], event.get("type", ""), event.get("message", ""))
        if returncode == 0 and running is None:
            break
        if running is None:
            raise RuntimeError(f"the child process failed outside the snippets ({_describe_exit(returncode, stderr)})")
        outcomes[running] = Outcome("crashed", detail=_describe_exit(returncode, stderr))
        pending = [(name, code) for name, code in pending if name not in outcomes]
    missing = set(snippets) - set(outcomes)
    assert not missing, f"no outcome for {sorted(missing)}"
    return outcomes
