"""Errors that enginepy raises on bad input; the CLI turns them into one line and exit code 2."""


class EnginepyError(Exception):
    """Base class of the errors a user can fix."""


class InvalidParameter(EnginepyError, ValueError):
    """A parameter is outside its allowed range; the message names the parameter and the range."""


class ModelFileError(EnginepyError, FileNotFoundError):
    """A model directory or weight file is missing, incomplete or inconsistent; the message says what."""
