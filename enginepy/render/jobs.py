"""Job files of `enginepy render`: JSONL, CSV or plain text -> validated jobs, and the bad lines with their reason.

Every line is checked before any rendering: its syntax, its keys, a safe and unique id, and its settings through
the engine's own validation (`make_params`, `check_duration`), so a bad line is reported with its number and the
exact message `add_request` would give, and never costs a model load or a render.

Defaults (the command line's): a job without `duration` gets --duration; a job without `seed` on line i (1-based)
gets --seed + i - 1, so every job has a fixed seed and a rerun computes the same audio; a job without `id` is
named by its line number.

Audio inputs: `melody` (MusicGen-Melody models) and `continue` name audio files (WAV, FLAC, Ogg), relative paths
against the job file's directory. Each is read and checked here (readable, non-empty, finite samples, a sane
rate; a continuation shorter than the job's duration) and its content hashed: the hash is part of what makes a
rendered job current, so a rerun re-renders a job whose audio file changed.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field

from ..engine.request import make_params
from ..errors import EnginepyError, InvalidParameter
from ..params import check_duration

# The settings a job line may give, in the order the manifest writes them.
SETTING_KEYS = ("duration", "use_sampling", "top_k", "top_p", "temperature", "cfg_coef")
# Settings a job's `settings` holds only when they differ from the default (None, False): the settings of jobs
# that do not use them stay what earlier versions recorded, so their files stay current.
OPTIONAL_SETTINGS = ("cfg_coef_beta", "two_step_cfg")
# Audio files a job may name: a melody (chroma conditioning) and an audio prompt to continue.
AUDIO_KEYS = ("melody", "continue")
JOB_KEYS = ("id", "prompt", "seed") + SETTING_KEYS + OPTIONAL_SETTINGS + AUDIO_KEYS
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".txt": "text"}
# Ids become file names: a portable set of characters, never a path, never hidden (temporary files start with '.').
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# How CSV cells (text) become the types JSON lines carry.
_CSV_INT = ("seed", "top_k")
_CSV_FLOAT = ("duration", "top_p", "temperature", "cfg_coef", "cfg_coef_beta")
_CSV_BOOL_KEYS = ("use_sampling", "two_step_cfg")
_CSV_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class Job:
    """One validated job. settings: duration (s), use_sampling, top_k (None resolved to min(250, V)), top_p,
    temperature, cfg_coef, and cfg_coef_beta / two_step_cfg when given (not None / True), with canonical types;
    frames = int(duration * frame_rate). audio: "melody" / "continue" -> {"path": absolute path, "sha256": hex
    digest of the file as it was read}, for the inputs the job names."""

    line: int
    id: str
    prompt: str
    seed: int
    settings: dict
    frames: int
    audio: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"line": self.line, "id": self.id, "prompt": self.prompt, "seed": self.seed,
                           "settings": self.settings, "frames": self.frames, "audio": self.audio})

    @classmethod
    def from_json(cls, text: str) -> "Job":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class BadLine:
    """A job line that cannot be rendered: its line number, its id when one was read, and why."""

    line: int
    id: str | None
    error: str


@dataclass(frozen=True)
class JobDefaults:
    """What the command line gives every job that does not say otherwise."""

    duration: float = 8.0
    seed: int = 0
    use_sampling: bool = True
    top_k: int | None = None
    top_p: float = 0.0
    temperature: float = 1.0
    cfg_coef: float = 3.0


def job_format(path: str) -> str:
    """'jsonl' | 'csv' | 'text' from the job file's extension."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext not in FORMATS:
        raise InvalidParameter(f"JOBS must end in {', '.join(FORMATS)} (the extension picks the format); got {path!r}")
    return FORMATS[ext]


def check_job_id(value) -> str:
    """A job id as the file name stem it becomes: an int or a safe string (letters, digits, '.', '_', '-')."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not _SAFE_ID.fullmatch(value):
        raise InvalidParameter(
            f"id must be a file name of letters, digits, '.', '_' and '-' that starts with a letter or digit "
            f"(at most 128 characters); got {value!r}"
        )
    return value


def read_text(path: str) -> str:
    """The job file as text; a missing, unreadable or non-UTF-8 file is one clear error."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise InvalidParameter(f"JOBS {path} does not exist") from None
    except IsADirectoryError:
        raise InvalidParameter(f"JOBS {path} is a directory; give a .jsonl, .csv or .txt file") from None
    except UnicodeDecodeError as e:
        raise InvalidParameter(f"JOBS {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise InvalidParameter(f"JOBS {path} cannot be read ({e.strerror})") from None


def _lines(text: str) -> list[str]:
    """Lines split at line feeds only (str.splitlines also splits at U+2028 and other characters that a JSON
    string or a prompt may hold), without a trailing carriage return."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _jsonl_records(text: str):
    """(line, dict of given keys) per non-blank line; a line that is not a JSON object raises at its number."""
    for number, raw in enumerate(_lines(text), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            yield number, InvalidParameter(f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(record, dict):
            yield number, InvalidParameter(f"a job must be a JSON object; got {type(record).__name__}")
            continue
        yield number, record


def _csv_value(key: str, cell: str):
    if key in _CSV_INT:
        try:
            return int(cell)
        except ValueError:
            raise InvalidParameter(f"{key} must be an integer; got {cell!r}") from None
    if key in _CSV_FLOAT:
        try:
            return float(cell)
        except ValueError:
            raise InvalidParameter(f"{key} must be a number; got {cell!r}") from None
    if key in _CSV_BOOL_KEYS:
        if cell.strip().lower() not in _CSV_BOOL:
            raise InvalidParameter(f"{key} must be true or false; got {cell!r}")
        return _CSV_BOOL[cell.strip().lower()]
    return cell


def _csv_records(text: str):
    """(line, dict) per CSV record after the header row; empty cells are left out (the default applies)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return
    header = [name.strip() for name in header]
    start = reader.line_num + 1
    for row in reader:
        number, start = start, reader.line_num + 1  # a quoted cell may span lines: a record starts where it starts
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            yield number, InvalidParameter(f"{len(row)} cells but the header names {len(header)} columns")
            continue
        record = {}
        try:
            for key, cell in zip(header, row):
                if cell.strip():
                    record[key] = _csv_value(key, cell)
        except InvalidParameter as e:
            yield number, e
            continue
        yield number, record


def _text_records(text: str):
    """(line, {prompt}) per non-blank line: the line without its surrounding white space is the prompt."""
    for number, raw in enumerate(_lines(text), start=1):
        if raw.strip():
            yield number, {"prompt": raw.strip()}


def file_sha256(path: str) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_audio_input(kind: str, path: str) -> tuple[str, float]:
    """An audio input file -> (sha256, seconds), after checking that it decodes to finite samples at a sane rate
    (audio_prompt.read_audio, the checks of `enginepy generate --melody / --continue`)."""
    from ..audio_prompt import read_audio

    if not os.path.exists(path):
        raise InvalidParameter(f"{kind} {path} does not exist")
    if not os.path.isfile(path):
        raise InvalidParameter(f"{kind} {path} is not a file")
    try:
        sha256 = file_sha256(path)
    except OSError as e:
        raise InvalidParameter(f"{kind} {path} cannot be read ({e.strerror})") from None
    wav, rate = read_audio(path, kind)  # [C, T]
    return sha256, wav.shape[-1] / rate


def _audio_inputs(record: dict, duration: float, melody_model: bool, base_dir: str, seen: dict) -> dict:
    """The job's melody / continue files -> {kind: {"path", "sha256"}}; each (kind, file) is read once per job
    file (`seen` caches the outcome), so a melody shared by many jobs costs one read."""
    audio = {}
    for kind in AUDIO_KEYS:
        value = record.get(kind)
        if value is None:
            continue
        if kind == "melody" and not melody_model:
            raise InvalidParameter("melody needs a MusicGen-Melody model (this one is conditioned on text only)")
        if not isinstance(value, str) or not value.strip():
            raise InvalidParameter(f"{kind} must be the path of an audio file (WAV, FLAC, Ogg); got {value!r}")
        path = os.path.normpath(os.path.join(base_dir, value))  # an absolute value stays as it is
        if (kind, path) not in seen:
            try:
                seen[kind, path] = _read_audio_input(kind, path)
            except EnginepyError as e:
                seen[kind, path] = e
        outcome = seen[kind, path]
        if isinstance(outcome, EnginepyError):
            raise InvalidParameter(str(outcome))
        sha256, seconds = outcome
        # Its codes take at least seconds * frame_rate frames: as long as the duration, nothing is left to generate.
        if kind == "continue" and seconds >= duration:
            raise InvalidParameter(f"continue {path} lasts {seconds:g} s; it must be shorter than duration "
                                   f"({duration:g} s), which includes it")
        audio[kind] = {"path": path, "sha256": sha256}
    return audio


def _validate(number: int, record: dict, defaults: JobDefaults, vocab_size: int, frame_rate: int,
              max_duration: float, melody_model: bool, base_dir: str, seen: dict) -> Job:
    unknown = [k for k in record if k not in JOB_KEYS]
    if unknown:
        raise InvalidParameter(f"unknown key {unknown[0]!r} (a job may give {', '.join(JOB_KEYS)})")
    job_id = check_job_id(record.get("id", number))
    if "prompt" not in record:
        raise InvalidParameter("prompt is missing")
    prompt = record["prompt"]
    if not isinstance(prompt, str):
        raise InvalidParameter(f"prompt must be a string; got {type(prompt).__name__}")
    seed = record.get("seed", defaults.seed + number - 1)
    duration = record.get("duration", defaults.duration)
    frames = check_duration(duration, frame_rate, max_duration)
    given = {k: record.get(k, getattr(defaults, k)) for k in SETTING_KEYS[1:]}
    params = make_params(vocab_size, seed=seed, cfg_coef_beta=record.get("cfg_coef_beta"),
                         two_step_cfg=record.get("two_step_cfg", False), **given)
    settings = {"duration": float(duration), "use_sampling": params.use_sampling, "top_k": params.top_k,
                "top_p": params.top_p, "temperature": params.temperature, "cfg_coef": params.cfg_coef}
    if params.cfg_coef_beta is not None:
        settings["cfg_coef_beta"] = params.cfg_coef_beta
    if params.two_step_cfg:
        settings["two_step_cfg"] = True
    audio = _audio_inputs(record, float(duration), melody_model, base_dir, seen)
    return Job(number, job_id, prompt, int(seed), settings, frames, audio)


def parse_jobs(path: str, defaults: JobDefaults, vocab_size: int, frame_rate: int,
               max_duration: float, melody_model: bool = False) -> tuple[list[Job], list[BadLine]]:
    """Read and validate a job file (format by extension). Returns the valid jobs and the bad lines, each in file
    order. A repeated id (compared ignoring case: 'A' and 'a' are one file on some file systems) is a bad line
    at its second use; the first use stays valid. melody_model: the model takes melodies (MusicGen-Melody); a
    `melody` on another model is a bad line."""
    kind = job_format(path)
    text = read_text(path).removeprefix("\ufeff")  # the byte order mark spreadsheet programs put before a CSV
    records = {"jsonl": _jsonl_records, "csv": _csv_records, "text": _text_records}[kind](text)
    base_dir = os.path.dirname(os.path.abspath(path))
    audio_seen: dict = {}
    jobs: list[Job] = []
    bad: list[BadLine] = []
    seen: dict[str, Job] = {}
    for number, record in records:
        if isinstance(record, EnginepyError):
            bad.append(BadLine(number, None, str(record)))
            continue
        try:
            job = _validate(number, record, defaults, vocab_size, frame_rate, max_duration, melody_model, base_dir,
                            audio_seen)
        except EnginepyError as e:
            given_id = record.get("id", number)
            named = isinstance(given_id, (str, int)) and not isinstance(given_id, bool)
            bad.append(BadLine(number, str(given_id) if named else None, str(e)))
            continue
        first = seen.get(job.id.lower())
        if first is not None:
            bad.append(BadLine(number, job.id, f"id {job.id!r} is already used by line {first.line}"
                               + (f" ({first.id!r}: file names that differ only in case clash)"
                                  if first.id != job.id else "")))
            continue
        seen[job.id.lower()] = job
        jobs.append(job)
    if not jobs and not bad:
        raise InvalidParameter(f"JOBS {path} holds no jobs")
    return jobs, bad
