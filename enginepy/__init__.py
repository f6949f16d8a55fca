"""enginepy: a fast, faithful MusicGen inference engine."""
from .api import MusicGen
from .errors import EnginepyError, InvalidParameter, ModelFileError

__all__ = ["MusicGen", "EnginepyError", "InvalidParameter", "ModelFileError"]
__version__ = "0.1.0"
