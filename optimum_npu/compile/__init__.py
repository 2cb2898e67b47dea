"""The compiler: torch module -> device program (`.rbln`)."""

from .compiler import CompiledModel, compile_from_torch

__all__ = ["CompiledModel", "compile_from_torch"]
