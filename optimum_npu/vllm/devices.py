"""Which simulated devices a vLLM engine's model runs on: `RBLN_DEVICES`, as the NPU stack names it.

A process given a device group (Ray does it for an actor that requests `RBLN` resources, as
its RBLN accelerator manager sets `RBLN_DEVICES` to the ids it assigned; a user does it by
hand to run two servers side by side) loads the compiled model on those devices, in rank order.
Without it the runtime picks the machine's first free devices of the right kind, as before.
The ids are the simulated machine's global device numbers (`optimum-npu smi`).
"""

from __future__ import annotations

import os

DEVICES_ENV = "RBLN_DEVICES"


def assigned_devices(tensor_parallel_size: int) -> tuple[int, ...] | None:
    """The device ids `RBLN_DEVICES` gives, one per tensor-parallel rank; None when it is unset
    or empty. ValueError naming the variable when it is malformed or lists a different number
    of devices than the folder was compiled for."""
    text = os.environ.get(DEVICES_ENV, "").strip()
    if not text:
        return None
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() and len(item) <= 5 for item in items):
        raise ValueError(f"{DEVICES_ENV}={text[:80]!r}: expected comma-separated device ids such as '0,1'")
    ids = tuple(int(item) for item in items)
    if len(set(ids)) != len(ids) or len(ids) != tensor_parallel_size:
        raise ValueError(
            f"{DEVICES_ENV}={text!r} lists {len(ids)} device id(s) ({len(set(ids))} distinct), but the folder "
            f"was compiled with tensor_parallel_size={tensor_parallel_size}: give {tensor_parallel_size} distinct ids"
        )
    return ids


def load_on_assigned_devices(folder: str):
    """The compiled decoder of `folder`, loaded on the devices RBLN_DEVICES names (else where
    the runtime picks); DeviceMemoryError when it does not fit them."""
    from ..modeling.auto import RBLNAutoModelForCausalLM
    from .folder import CompiledDecoder

    devices = assigned_devices(CompiledDecoder.read(folder).tensor_parallel_size)
    options = {} if devices is None else {"rbln_device": list(devices)}
    return RBLNAutoModelForCausalLM.from_pretrained(folder, **options)
