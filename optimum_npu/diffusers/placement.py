"""Where a pipeline's compiled components go: device memory per component and a placement.

Each component is compiled on its own and runs on its own devices (`device` per component).
`component_memory` tells what each needs per device (from the compiled programs' memory plans,
so it works for components compiled on the meta device, without weights or runtimes);
`place_components` assigns devices of a server so that everything fits, a tensor-parallel
component on devices of one card (its collectives stay on the card's links):

    compiled = RBLNCosmosTextToWorldPipeline.compile_components(meta_models, rbln_config={...})
    placement = place_components(component_memory(compiled), "RBLN-CA25")   # a server: 32 devices
    # {"transformer": (0, 1, 2, 3), "text_encoder": (4,), "vae": (5,)}: rbln_config={"transformer": {"device": [0, 1, 2, 3]}, ...}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..modeling.base import RBLNModel
from ..sim_device.stats import format_bytes
from ..sim_device.specs import get_npu_spec

# An ATOM-Max server (32 devices), as the preset says.
CA25_SERVER_DEVICES = get_npu_spec("RBLN-CA25").devices_per_server


@dataclass(frozen=True)
class ComponentMemory:
    """Device memory one compiled component needs on each of its devices."""

    bytes_per_device: int
    tensor_parallel_size: int
    npu: str

    def __str__(self) -> str:
        return f"{format_bytes(self.bytes_per_device)} x {self.tensor_parallel_size} device(s)"


def component_memory(components: Mapping[str, RBLNModel]) -> dict[str, ComponentMemory]:
    """What each compiled component needs per device: the sum over its graphs (each graph's runtime
    holds its own weights and activations), the largest rank of each."""
    found = {}
    for name, model in components.items():
        plans = [graph.program.memory for graph in model.graphs.values()]
        per_device = sum(max(plan.total_bytes(rank) for rank in range(plan.num_devices)) for plan in plans)
        found[name] = ComponentMemory(per_device, model.rbln_config.tensor_parallel_size, model.rbln_config.npu)
    return found


def place_components(memory: Mapping[str, ComponentMemory], npu: str,
                     num_devices: int | None = None) -> dict[str, tuple[int, ...]]:
    """Devices for each component (largest first, first fit) on `num_devices` devices of `npu`
    (by default one server of them); a tensor-parallel component takes consecutive devices within
    one card. ValueError naming the component that does not fit."""
    spec = get_npu_spec(npu)
    num_devices = spec.devices_per_server if num_devices is None else num_devices
    free = [spec.usable_dram_bytes] * num_devices
    placement = {}
    for name, need in sorted(memory.items(), key=lambda item: -item[1].bytes_per_device * item[1].tensor_parallel_size):
        if need.npu != npu:
            raise ValueError(f"{name} is compiled for {need.npu}, not {npu}")
        tp, chosen = need.tensor_parallel_size, None
        group = spec.devices_per_card if tp <= spec.devices_per_card else tp  # larger TP spans whole cards
        for start in range(0, num_devices - tp + 1):
            if tp > 1 and start % group + tp > group:
                continue  # would straddle two cards
            devices = range(start, start + tp)
            if all(free[d] >= need.bytes_per_device for d in devices):
                chosen = tuple(devices)
                break
        if chosen is None:
            raise ValueError(
                f"{name} needs {need} and does not fit on the {num_devices} {npu} device(s) left after "
                f"{', '.join(placement) or 'nothing'}: compile it with a larger rbln tensor_parallel_size, a smaller "
                f"size, or plan for more devices")
        for d in chosen:
            free[d] -= need.bytes_per_device
        placement[name] = chosen
    return {name: placement[name] for name in memory}
