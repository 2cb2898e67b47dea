"""PyTorch-native use of the simulated NPU: `torch.compile(model, backend="rbln")`.

Importing this package registers the backend name in this process; an installed package also
declares it through the `torch_dynamo_backends` entry point, so no import is needed.
"""

from .dynamo import CompiledGraph, compiled_graphs, rbln_backend, register, reset

register()

__all__ = ["CompiledGraph", "compiled_graphs", "rbln_backend", "register", "reset"]
