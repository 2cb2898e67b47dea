"""PyTorch-native use of the simulated NPU.

- `torch.compile(model, backend="rbln", options={...})` (`dynamo.py`): Dynamo's graphs compiled
  and run on the device. Importing this package registers the name in this process; an installed
  package also declares it through the `torch_dynamo_backends` entry point, so no import is needed.
- The eager `rbln` device (`eager.py`): importing this package makes "rbln" a torch device
  (`torch.randn(4, 4, device="rbln")`, `model.to("rbln")`); `configure(...)` picks its NPU, dtype,
  numerics and which simulated device it is.
"""

from .dynamo import CompiledGraph, compiled_graphs, rbln_backend, register, reset
from .eager import configure, enable

register()
enable()

__all__ = ["CompiledGraph", "compiled_graphs", "configure", "enable", "rbln_backend", "register", "reset"]
