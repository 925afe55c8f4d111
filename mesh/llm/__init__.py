"""Local LLMs: llama.cpp behind asyncio, the tiny test model, and the default real model."""

from mesh.llm.engine import (
    Device,
    EngineError,
    FinishReason,
    Generation,
    LlamaEngine,
    Piece,
    SamplingOptions,
)
from mesh.llm.text import StopMatcher, Utf8Decoder

__all__ = [
    "Device",
    "EngineError",
    "FinishReason",
    "Generation",
    "LlamaEngine",
    "Piece",
    "SamplingOptions",
    "StopMatcher",
    "Utf8Decoder",
]
