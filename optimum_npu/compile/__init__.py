"""The compiler: torch module -> device program (`.rbln`)."""

from .compiler import CompiledModel, ProgramTooLargeError, compile_from_torch

__all__ = ["CompiledModel", "ProgramTooLargeError", "compile_from_torch"]
