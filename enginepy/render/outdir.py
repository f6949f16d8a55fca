"""The output directory of `enginepy render`: audio files, the manifest, and what makes a rerun resume.

    DIR/<id>.wav (or .flac)   one file per job, written atomically (temporary name, then rename)
    DIR/manifest.jsonl        one JSON object per line, see `done_entry` / `failed_entry`

During a run the manifest is a journal: each finished job appends its line with flush + fsync, so a SIGKILL
loses at most the jobs in flight. A job counts as done iff its latest line says "done" with the same prompt,
settings, seed, frames, model, dtype, file name and audio inputs (the sha256 of each melody / continue file) as
the job now asks for, AND the file's sha256 is the one recorded; anything else (no line, a changed setting or
audio input, a missing, truncated or altered file) is rendered again.
A run starts by compacting the manifest to the verified lines and ends by rewriting it in job-file order, so
its content does not depend on the order jobs finished or on interruptions: only `compute_s` (measured time)
differs between runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass

from ..audio_io import write_atomically
from ..errors import EnginepyError, InvalidParameter
from .jobs import AUDIO_KEYS, BadLine, Job, file_sha256

MANIFEST = "manifest.jsonl"
# audio_io.write_atomically names its temporary files so: a SIGKILL during a write leaves one behind.
TEMP_PREFIX = ".enginepy-"
# The fields of a done line that must equal the job's for its file to be reused (and, for each audio input, the
# sha256 of its file: a moved file with the same content is the same input).
IDENTITY = ("prompt", "settings", "seed", "frames", "model", "dtype", "file")


class OutputBusy(EnginepyError, RuntimeError):
    """Another process is rendering into the same directory."""


class OutputError(EnginepyError, OSError):
    """A file in the output directory could not be written (disk full, directory made read-only mid-run)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot write {path} ({reason}); the jobs finished so far are recorded: run the same "
                         "command again to resume")


@contextlib.contextmanager
def writing(path: str):
    """Turn a failed write of `path` into an OutputError: one line, not a traceback, however it failed."""
    import soundfile

    try:
        yield
    except OSError as e:
        raise OutputError(path, e.strerror or str(e)) from None
    except soundfile.SoundFileError as e:
        raise OutputError(path, str(e)) from None


@dataclass(frozen=True)
class OutputKey:
    """What, beyond a job's own fields, decides its audio: the model (a local path made absolute, or a hub id),
    the decoder dtype, and the file format ('wav' | 'flac'). Backend and device compute the same function and
    are not part of it."""

    model: str
    dtype: str
    fmt: str

    def file_name(self, job: Job) -> str:
        return f"{job.id}.{self.fmt}"


def done_entry(job: Job, key: OutputKey, sha256: str, compute_s: float) -> dict:
    """The manifest line of a rendered job. compute_s: wall seconds from the job entering the engine to its file
    being written (slots are shared, so this is latency, not exclusive compute). A job with audio inputs also
    records each one, "melody" / "continue": {"path", "sha256"} of the file it was rendered from."""
    entry = {"id": job.id, "line": job.line, "status": "done", "prompt": job.prompt, "settings": job.settings,
             "seed": job.seed, "frames": job.frames, "model": key.model, "dtype": key.dtype}
    entry.update({kind: dict(job.audio[kind]) for kind in AUDIO_KEYS if kind in job.audio})
    entry.update({"file": key.file_name(job), "sha256": sha256, "compute_s": round(compute_s, 3)})
    return entry


def _input_hashes(entry: dict) -> dict:
    """kind -> sha256 of the audio inputs a done line (or a job's expected line) records."""
    return {kind: entry[kind].get("sha256") if isinstance(entry[kind], dict) else None
            for kind in AUDIO_KEYS if kind in entry}


def failed_entry(line: int, job_id: str | None, error: str) -> dict:
    """The manifest line of a job that could not be rendered (a bad line, or a request the engine refused)."""
    return {"id": job_id, "line": line, "status": "failed", "error": error}


def bad_line_entry(bad: BadLine) -> dict:
    return failed_entry(bad.line, bad.id, bad.error)


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputDir:
    """One render's hold on DIR: an exclusive lock for the run, the manifest journal, and the verification of
    what earlier runs left. Use as a context manager (the lock is released on exit)."""

    def __init__(self, path: str):
        self.path = path
        self.manifest = os.path.join(path, MANIFEST)
        self._lock_fd: int | None = None
        self._journal = None

    def __enter__(self) -> "OutputDir":
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise InvalidParameter(f"--out {self.path} cannot be created ({e.strerror})") from None
        # flock on the directory itself: two renders into one directory would redo and overwrite each other's
        # files, and no lock file is left behind to make the directory differ from an uninterrupted run.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(f"--out {self.path} is being rendered by another process; wait for it or use "
                             "another directory") from None
        self._lock_fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_temporaries(self) -> list[str]:
        """Delete the temporary files a killed run left (audio or manifest being written); returns their names."""
        removed = []
        for name in sorted(os.listdir(self.path)):
            path = os.path.join(self.path, name)
            if name.startswith(TEMP_PREFIX) and os.path.isfile(path) and not os.path.islink(path):
                os.remove(path)
                removed.append(name)
        return removed

    def read_manifest(self) -> dict[str, dict]:
        """id -> its latest "done" line (failed lines never make a job done; a repeated id's failed line must not
        hide the first use's done one). Lines that are not JSON objects (cut short by a crash) are ignored."""
        latest: dict[str, dict] = {}
        try:
            with open(self.manifest, encoding="utf-8", errors="replace") as f:
                for raw in f:
                    try:
                        entry = json.loads(raw)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(entry, dict) and entry.get("status") == "done" and isinstance(entry.get("id"), str):
                        latest[entry["id"]] = entry
        except FileNotFoundError:
            pass
        return latest

    def verified(self, jobs: list[Job], key: OutputKey) -> dict[str, dict]:
        """id -> the done line, rebuilt for the job as it is now (its line number may have moved), of every job
        whose recorded identity matches and whose file's sha256 is the recorded one."""
        recorded = self.read_manifest()
        done = {}
        for job in jobs:
            entry = recorded.get(job.id)
            if entry is None:
                continue
            expected = done_entry(job, key, "", 0.0)
            if any(entry.get(k) != expected[k] for k in IDENTITY) or _input_hashes(entry) != _input_hashes(expected):
                continue
            path = os.path.join(self.path, expected["file"])
            if not os.path.isfile(path) or file_sha256(path) != entry.get("sha256"):
                continue
            compute_s = entry.get("compute_s")
            done[job.id] = done_entry(job, key, entry["sha256"],
                                      compute_s if isinstance(compute_s, (int, float)) else 0.0)
        return done

    def rewrite(self, entries: list[dict]) -> None:
        """Replace the manifest atomically with `entries`, in the order given (closes an open journal first)."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for entry in entries:
                    f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())

        with writing(self.manifest):
            write_atomically(self.manifest, write)
            _fsync_directory(self.path)

    def append(self, entry: dict) -> None:
        """Add one line to the manifest, durable before this returns (flush + fsync)."""
        with writing(self.manifest):
            if self._journal is None:
                self._journal = open(self.manifest, "a", encoding="utf-8")
            self._journal.write(json.dumps(entry) + "\n")
            self._journal.flush()
            os.fsync(self._journal.fileno())


def ordered(entries: list[dict]) -> list[dict]:
    """Manifest lines in job-file order (line numbers are unique per job file)."""
    return sorted(entries, key=lambda e: e["line"])
