"""Scheduling and dtype lowering: fused groups -> the device program's steps.

The device has no fp32 arithmetic. Floating values on the device are in its 16-bit type,
so every float dtype an op names becomes the device float placeholder, a float input is
copied to the device as is and cast there ("input cast"), and a float output is cast back
to its original dtype ("output upcast") before the copy to the host. Host-fallback
segments compute in fp32: their inputs are copied out of the device, their results copied
back in (cast to 16-bit on the host first, halving the transfer).
"""

from __future__ import annotations

from ..sim_device.program import DEVICE_FLOAT, OpCall, Step, StepKind, TensorSpec, dtype_size
from .frontend import Graph, Node
from .fusion import Group
from .op_support import Category

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _rewrite(arg, rename: dict[str, str], float_dtype: str):
    """Rename value refs and replace float dtypes, in an encoded op argument."""
    if isinstance(arg, list):
        return [_rewrite(a, rename, float_dtype) for a in arg]
    if isinstance(arg, dict):
        if "ref" in arg:
            return {"ref": rename.get(arg["ref"], arg["ref"])}
        if arg.get("dtype") in FLOAT_DTYPES:
            return {"dtype": float_dtype}
    return arg


class Scheduler:
    def __init__(self, graph: Graph, device_dtype: str):
        self.graph = graph
        self.device_dtype = device_dtype
        self.steps: list[Step] = []
        self.values: dict[str, TensorSpec] = {}            # as each value lives on its side
        self.on_device: dict[str, str] = {}                 # value -> name of its device copy
        self.on_host: dict[str, str] = {}                   # value -> name of its host copy
        for spec in graph.weights + graph.buffers:
            self.on_device[spec.name] = spec.name
            self.values[spec.name] = self._device_spec(graph.values[spec.name])  # one device's shard
        for spec in graph.inputs:
            self.on_host[spec.name] = spec.name
            self.values[spec.name] = spec

    def _device_spec(self, spec: TensorSpec, name: str | None = None) -> TensorSpec:
        dtype = self.device_dtype if spec.dtype in FLOAT_DTYPES else spec.dtype
        return TensorSpec(name or spec.name, spec.shape, dtype)

    def _host_spec(self, spec: TensorSpec, name: str) -> TensorSpec:
        return TensorSpec(name, spec.shape, "float32" if spec.dtype in FLOAT_DTYPES else spec.dtype)

    # ---- moving values between host and device --------------------------------------

    def to_device(self, name: str) -> str:
        if name in self.on_device:
            return self.on_device[name]
        host_name, spec = self.on_host[name], self.graph.values[name]
        is_user_input = host_name in {s.name for s in self.graph.inputs}
        is_float = spec.dtype in FLOAT_DTYPES
        needs_cast_kernel = is_user_input and is_float and spec.dtype != self.device_dtype
        copy_name = f"{name}@device"
        copied = TensorSpec(copy_name, spec.shape, spec.dtype if needs_cast_kernel else self._device_spec(spec).dtype)
        self.values[copy_name] = copied
        self.steps.append(Step(
            kind=StepKind.H2D, name=f"{name} to device", inputs=[host_name], outputs=[copy_name],
            bytes_read=copied.nbytes, cast_to_device_float=is_float and not needs_cast_kernel,
        ))
        device_name = copy_name
        if needs_cast_kernel:
            device_name = f"{name}@{self.device_dtype}"
            cast = self._device_spec(spec, device_name)
            self.values[device_name] = cast
            self.steps.append(Step(
                kind=StepKind.KERNEL, name=f"input cast {name}", inputs=[copy_name], outputs=[device_name],
                ops=[OpCall("aten._to_copy.default", [{"ref": copy_name}], {"dtype": {"dtype": DEVICE_FLOAT}}, [device_name])],
                vector_flops=float(cast.numel), bytes_read=copied.nbytes, bytes_written=cast.nbytes,
            ))
        self.on_device[name] = device_name
        return device_name

    def to_host(self, name: str) -> str:
        if name in self.on_host:
            return self.on_host[name]
        device_name = self.on_device[name]
        host_name = f"{name}@host"
        self.values[host_name] = TensorSpec(host_name, self.values[device_name].shape, self.values[device_name].dtype)
        self.steps.append(Step(
            kind=StepKind.D2H, name=f"{name} to host", inputs=[device_name], outputs=[host_name],
            bytes_written=self.values[device_name].nbytes,
        ))
        self.on_host[name] = host_name
        return host_name

    # ---- kernels and host segments --------------------------------------------------

    def add_group(self, group: Group, used_later: set[str]) -> None:
        external = []
        for node in group.nodes:
            for name in node.inputs:
                if name not in group.produced and name not in external:
                    external.append(name)
        move = self.to_host if group.on_host else self.to_device
        rename = {name: move(name) for name in external}
        float_dtype = "float32" if group.on_host else DEVICE_FLOAT
        ops = [
            OpCall(
                target=n.target,
                args=_rewrite(n.args, rename, float_dtype),
                kwargs={k: _rewrite(v, rename, float_dtype) for k, v in n.kwargs.items()},
                outputs=n.outputs,
            )
            for n in group.nodes
        ]
        for name in group.produced:
            original = self.graph.values[name]
            self.values[name] = self._host_spec(original, name) if group.on_host else self._device_spec(original)
            (self.on_host if group.on_host else self.on_device)[name] = name
        outputs = [o for n in group.nodes for o in n.outputs if o and o in used_later]
        step = Step(
            kind=group.kind,
            name=group.name,
            inputs=[rename[name] for name in external],
            outputs=outputs,
            ops=ops,
            flops=sum(n.work.flops for n in group.nodes),
            vector_flops=sum(n.work.vector_flops for n in group.nodes),
            bytes_read=sum(self._bytes_read(name, rename[name], group) for name in external),
            bytes_written=sum(self.values[o].nbytes for o in outputs)
            + sum(self.values[n.outputs[0]].nbytes for n in group.nodes if n.mutates and n.outputs[0]),
            dynamic_cost=any(n.category is Category.ATTENTION for n in group.nodes),
            matmul_rows=max(group.nodes, key=lambda n: n.work.flops).work.rows,
            matmul_format=max(group.nodes, key=lambda n: n.work.flops).work.matmul_format,
        )
        if step.dynamic_cost:
            self._price_attention(step, group.nodes)
        self.steps.append(step)

    def _bytes_read(self, name: str, device_name: str, group: Group) -> int:
        """Bytes a kernel reads of input `name`: all of it, or only the rows its gathers pick
        when gathers (an embedding lookup) are all that read it."""
        spec = self.values[device_name]
        readers = [n for n in group.nodes if name in n.inputs]
        if readers and all(n.work.gathered_elements and n.inputs[0] == name for n in readers):
            return min(spec.nbytes, sum(n.work.gathered_elements for n in readers) * dtype_size(spec.dtype))
        return spec.nbytes

    def _price_attention(self, step: Step, nodes: list[Node]) -> None:
        """Worst case (every sequence at full length) for the compile-time estimate."""
        from ..sim_device.kernels import ATTENTION_OPS, attention_cost

        flops = read = written = 0
        for node in nodes:
            f, r, w = attention_cost(node.target, node.fake_args, float_bytes=dtype_size(self.device_dtype))
            flops, read, written = flops + f, read + r, written + w
            if f and node.target in ATTENTION_OPS:
                # QK^T and PV: the query rows sharing a KV head ([B, Hq, T, D] against [.., Hkv, .., D])
                q, k_cache = node.fake_args[0], node.fake_args[1]
                step.matmul_rows = q.shape[1] // k_cache.shape[1] * q.shape[2]
            # args[4]: block_tables [B, blocks] of the cache update, start_pos [B] of the attention ops
            step.sequences = max(step.sequences, node.fake_args[4].shape[0])
        step.flops, step.bytes_read, step.bytes_written = flops, read, written
        step.vector_flops = 0.0

    def add_outputs(self) -> list[TensorSpec]:
        specs = []
        for name in self.graph.outputs:
            original = self.graph.values[name]
            if name not in self.on_host:
                device_name = self.on_device[name]
                if original.dtype in FLOAT_DTYPES and original.dtype != self.device_dtype:
                    upcast = f"{name}@{original.dtype}"
                    self.values[upcast] = TensorSpec(upcast, original.shape, original.dtype)
                    device_spec = self.values[device_name]
                    self.steps.append(Step(
                        kind=StepKind.KERNEL, name=f"output upcast {name}", inputs=[device_name], outputs=[upcast],
                        ops=[OpCall("aten._to_copy.default", [{"ref": device_name}],
                                    {"dtype": {"dtype": original.dtype}}, [upcast])],
                        vector_flops=float(original.numel), bytes_read=device_spec.nbytes,
                        bytes_written=original.numel * dtype_size(original.dtype),
                    ))
                    self.on_device[name] = upcast
                self.to_host(name)
            specs.append(TensorSpec(self.on_host[name], original.shape, original.dtype))
        return specs


def build_steps(graph: Graph, groups: list[Group], device_dtype: str):
    """-> (steps, values, output specs)."""
    scheduler = Scheduler(graph, device_dtype)
    # A value is "used later" by a group if any later group reads it or it is an output.
    used_after: list[set[str]] = []
    later: set[str] = set(graph.outputs)
    for group in reversed(groups):
        used_after.append(set(later))
        for node in group.nodes:
            later.update(node.inputs)
    used_after.reverse()
    for group, used_later in zip(groups, used_after):
        scheduler.add_group(group, used_later)
    outputs = scheduler.add_outputs()
    return scheduler.steps, scheduler.values, outputs
