"""The step engine: continuous batching (requests join and leave at any decode step) on either backend."""
from .engine import Engine
from .reference import ReferenceRunner
from .request import EngineFull, NonFiniteLogits, Request, RequestOutput, SamplingParams

__all__ = ["Engine", "EngineFull", "NonFiniteLogits", "ReferenceRunner", "Request", "RequestOutput", "SamplingParams"]
