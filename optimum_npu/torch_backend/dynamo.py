"""`torch.compile(model, backend="rbln", options={...})`: TorchDynamo's FX graphs compiled for the
simulated NPU and run on it.

Dynamo hands the backend one FX graph per region it could capture (a graph break ends a region:
host Python runs between the programs). Each graph is compiled by our compiler and run by a
`Runtime`, one per graph and input shape.

How a graph reaches the compiler: the Dynamo `GraphModule` is wrapped in a module that holds the
graph's parameters and buffers (Dynamo lifts them to graph inputs) as its own, and that wrapper goes
through `compile_from_torch`, i.e. `torch.export`. Not `aot_autograd`: its inference graphs are
traced below the CompositeImplicitAutograd ops (a `linear` arrives as `t` + `addmm`, a
`layer_norm` as its arithmetic) with the weights as plain inputs, while our frontend, fusion and
cost model work on torch.export's pre-dispatch ATen graph, where `linear`, `layer_norm` and
`scaled_dot_product_attention` stay whole and weights are weights (held on the device, not copied
in on every call). One frontend, the one `compile_from_torch` uses, serves both entries.

Shapes: the device runs static shapes. Under `dynamic=False` Dynamo's guards recompile for a new
shape (a new graph reaches the backend). When Dynamo makes a graph dynamic (its automatic dynamic
shapes, after a second shape), the backend specialises the graph itself: one program per concrete
shape seen, compiled on first use.

Weights: a compiled program holds its own copy of the weights. Dynamo does not guard on parameter
values, so every call checks that the parameters and buffers it gets are the tensors the program
was compiled from, unchanged (same object, same version counter); otherwise it compiles again.

In-place writes to a graph's inputs (a transformers StaticCache's `index_copy_`) are made out of
place and copied back into the inputs on the host after each run (`_functional`). A graph the
compiler cannot take (an op neither the device nor the host fallback runs, a write through a view
of an input) runs eagerly on the host, with a one-time warning naming the reason; its
`CompiledGraph.fallback_reason` says so too. Inference only: outputs carry no autograd history.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch

from ..compile import cache as compile_cache
from ..compile import compile_from_torch
from ..compile.compiler import CompiledModel
from ..sim_device.runtime import Runtime, RuntimeStats
from ..sim_device.specs import DEFAULT_NPU

BACKEND_NAME = "rbln"

OPTIONS = {
    "npu": DEFAULT_NPU,
    "dtype": "bfloat16",
    "numerics": "device",
    "tensor_parallel_size": 1,
    "device": None,
    "activate_profiler": False,
    "cache": True,          # keep / reuse compiled programs in the compile cache (compile/cache.py)
}


def checked_options(options: dict | None) -> dict:
    """The backend's options with defaults filled in; ValueError naming an unknown one."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for backend={BACKEND_NAME!r}; "
                         f"the options are: {', '.join(OPTIONS)}")
    for flag in ("activate_profiler", "cache"):
        if not isinstance(options.get(flag, False), bool):
            raise ValueError(f"option {flag} must be True or False, got {options[flag]!r}")
    return {**OPTIONS, **options}


@dataclass
class ShapeProgram:
    """One compiled program of a graph: for one set of input shapes."""

    compiled: CompiledModel
    runtime: Runtime
    input_shapes: list[list[int]]         # of the graph's own inputs (not its parameters / buffers)
    compile_s: float                      # host time the compilation (or the cache lookup) took
    static_versions: list[int]            # version counters of the held parameters / buffers when compiled
    from_cache: bool = False              # loaded from the compile cache, not compiled


@dataclass
class CompiledGraph:
    """One Dynamo graph given to the backend: its programs (one per input shape), or the reason it
    runs on the host. `stats` is the simulated device time and memory of its runs."""

    index: int
    options: dict
    graph_module: torch.fx.GraphModule
    programs: dict[tuple, ShapeProgram] = field(default_factory=dict)
    fallback_reason: str | None = None
    host_runs: int = 0

    @property
    def on_device(self) -> bool:
        return self.fallback_reason is None

    @property
    def stats(self) -> RuntimeStats:
        """Simulated time of every run of this graph (all its shapes), and the device memory of
        its latest program."""
        total = RuntimeStats()
        for program in self.programs.values():
            s = program.runtime.stats
            total.add_breakdown(s)
            total.runs += s.runs
            total.total_s += s.total_s
            total.last_run_s = s.last_run_s if s.runs else total.last_run_s
            total.memory = s.memory
        return total

    @property
    def compile_s(self) -> float:
        return sum(p.compile_s for p in self.programs.values())

    def summary(self) -> str:
        if not self.on_device:
            return f"graph {self.index}: on the host ({self.fallback_reason}), {self.host_runs} run(s)"
        lines = [f"graph {self.index}: {len(self.programs)} program(s), compiled in {self.compile_s:.2f} s"]
        for program in self.programs.values():
            lines.append(f"  inputs {program.input_shapes}: {program.compiled.summary()}")
        return "\n".join(lines + ["  " + line for line in str(self.stats).splitlines()])

    def save_trace(self, path) -> list[str]:
        """Write the Perfetto trace of each program's runs (`path`, or `path` with the program's
        number before the suffix when there are several); needs `activate_profiler=True`."""
        from pathlib import Path

        path, runtimes = Path(path), [p.runtime for p in self.programs.values()]
        if len(runtimes) == 1:
            return [runtimes[0].save_trace(path)]
        return [r.save_trace(path.with_name(f"{path.stem}.{i}{path.suffix}")) for i, r in enumerate(runtimes)]


# Weak references: a graph (its programs, their device memory) lives as long as Dynamo keeps the compiled
# code that calls it, not as long as the process; after torch._dynamo.reset() its device memory is free.
_GRAPHS: list[weakref.ref[CompiledGraph]] = []
_NUMBERS = itertools.count()
_LOCK = threading.Lock()


def compiled_graphs() -> list[CompiledGraph]:
    """Every graph the `rbln` backend was given in this process and that is still in use, in order (see `reset`)."""
    with _LOCK:
        _GRAPHS[:] = [ref for ref in _GRAPHS if ref() is not None]
        return [graph for graph in (ref() for ref in _GRAPHS) if graph is not None]


def reset() -> None:
    """Forget the graphs recorded so far (their runtimes stay alive while a compiled model uses them)."""
    with _LOCK:
        _GRAPHS.clear()


class _GraphWithState(torch.nn.Module):
    """A Dynamo graph whose lifted parameters / buffers are this module's own, its other tensor
    inputs its forward's arguments, and its symbolic sizes fixed to one call's values."""

    def __init__(self, graph_module: torch.fx.GraphModule, names: list[str], static: dict[int, torch.Tensor],
                 constants: dict[int, object]):
        super().__init__()
        self.graph_module = graph_module
        self._slots: list[tuple[str, object]] = []  # per graph input: ("state", name) / ("const", v) / ("arg", None)
        for i, name in enumerate(names):
            if i in static:
                tensor = static[i]
                if isinstance(tensor, torch.nn.Parameter):
                    self.register_parameter(name, tensor)
                else:
                    self.register_buffer(name, tensor)
                self._slots.append(("state", name))
            elif i in constants:
                self._slots.append(("const", constants[i]))
            else:
                self._slots.append(("arg", None))

    def forward(self, *tensors):
        it = iter(tensors)
        args = [getattr(self, v) if kind == "state" else v if kind == "const" else next(it)
                for kind, v in self._slots]
        return tuple(self.graph_module(*args))


def _is_static(t) -> bool:
    """A parameter or buffer Dynamo lifted to a graph input (it marks them; a parameter always is one)."""
    return isinstance(t, torch.nn.Parameter) or getattr(t, "_dynamo_static_input_type", None) is not None


def _functional(gm: torch.fx.GraphModule, static: set[int]) -> tuple[torch.fx.GraphModule, list[int], int]:
    """`gm` with its in-place writes to its inputs made out of place: (the new graph, the indices
    of the inputs it writes, in the order their new values follow the graph's own outputs, the
    number of its own outputs). The caller runs the new graph and copies each new value into its
    input on the host, which is what the writes did.

    Why: a compiled program writes only its own buffers, while a transformers StaticCache is
    handed to Dynamo's graph as inputs (`keys / values.index_copy_(2, cache_position, ...)`,
    `cumulative_length.add_(n)`, through a no-op `.to(device)` alias in the first call). Rewritten:
    an in-place Tensor method (`x.add_(y)`) whose tensor is an input or a `.to()` of one (which
    returns the tensor itself when nothing changes, as here) becomes the out-of-place method, and
    every later use of that input (or alias) reads the new value. Anything else that writes an
    input (through a slice, a `torch.*_` function, `copy_` into a view) is left as it is: the
    compiler refuses it and the graph runs on the host, as before."""
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    index = {n: i for i, n in enumerate(placeholders) if i not in static}
    root: dict[torch.fx.Node, torch.fx.Node] = {n: n for n in index}   # alias -> the input it is
    current: dict[torch.fx.Node, torch.fx.Node] = {}                    # input -> its latest value
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_method" or not node.args or node.args[0] not in root:
            continue
        base = root[node.args[0]]
        if node.target == "to" and all(isinstance(a, torch.device) or (isinstance(a, str) and a == "cpu")
                                       for a in list(node.args[1:]) + list(node.kwargs.values())):
            root[node] = base  # a device-only .to() of a CPU tensor: the tensor itself
            continue
        name = node.target
        if not (name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1])):
            continue
        with graph.inserting_after(node):
            new = graph.call_method(name[:-1], node.args, node.kwargs)
        new.meta = dict(node.meta)
        for alias in [a for a, r in root.items() if r is base]:  # later readers of the input see the new value
            for user in list(alias.users):
                if user not in (node, new) and order[user] > order[node]:
                    user.replace_input_with(alias, new)
        for user in list(node.users):  # and so do readers of what the in-place method returned
            user.replace_input_with(node, new)
        graph.erase_node(node)
        order[new] = order.pop(node)
        current[base] = new
        root[new] = base
    output = next(n for n in graph.nodes if n.op == "output")
    own = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    written = [base for base in placeholders if base in current]
    output.args = (tuple(own + [current[b] for b in written]),)
    graph.lint()
    gm.recompile()
    return gm, [index[b] for b in written], len(own)


class _RBLNGraphCallable:
    """What the backend returns for one graph: runs it on the device, compiling per input shape."""

    def __init__(self, record: CompiledGraph, example_inputs):
        self.record = record
        gm = record.graph_module
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.names = [f"state_{i}_{n.name}"[:120] for i, n in enumerate(placeholders)]
        self.static = {i: t for i, t in enumerate(example_inputs) if isinstance(t, torch.Tensor) and _is_static(t)}
        self.functional, self.written, self.own_outputs = _functional(gm, set(self.static))
        self.warned = False

    def __call__(self, *args):
        if not self.record.on_device:
            return self._on_host(args)
        key = (tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)),
               tuple(int(a) if isinstance(a, (int, torch.SymInt)) else None for a in args),
               tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        program = self.record.programs.get(key)
        static_now = {i: args[i] for i in self.static}
        if program is not None and not self._state_unchanged(program, static_now):
            program.runtime.close()
            del self.record.programs[key]
            program = None
        if program is None:
            try:
                program = self._compile(args, static_now)
            except (ValueError, TypeError, NotImplementedError) as e:
                self.record.fallback_reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                return self._on_host(args)
            self.record.programs[key] = program
        self.static = static_now
        user = [a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in static_now]
        out = program.runtime(*user)
        out = list(out) if isinstance(out, tuple) else [out]
        for i, value in zip(self.written, out[self.own_outputs:]):
            args[i].copy_(value)  # what the graph's in-place writes to its inputs did (see _functional)
        return out[:self.own_outputs]

    def _state_unchanged(self, program: ShapeProgram, static_now: dict) -> bool:
        return all(static_now[i] is self.static[i] for i in static_now) and \
            [t._version for t in static_now.values()] == program.static_versions

    def _compile(self, args, static_now) -> ShapeProgram:
        options = self.record.options
        constants = {i: int(a) for i, a in enumerate(args) if isinstance(a, (int, torch.SymInt))}
        non_tensor = [type(a).__name__ for a in args if not isinstance(a, (torch.Tensor, int, torch.SymInt))]
        if non_tensor:
            raise TypeError(f"graph inputs of type {', '.join(non_tensor)} are not supported")
        module = _GraphWithState(self.functional, self.names, static_now, constants)
        user = [a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in static_now]
        start = time.perf_counter()
        target = {k: options[k] for k in ("npu", "dtype", "numerics", "tensor_parallel_size")}
        key = self._cache_key(module, user, constants, target) if options["cache"] else None
        compiled = compile_cache.load(key) if key else None
        from_cache = compiled is not None
        if compiled is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.export's notes about the wrapped graph are not the user's business
                compiled = compile_from_torch(module, example_inputs=user, **target)
            if key:
                compile_cache.store(key, compiled)
        runtime = compiled.create_runtime(device=options["device"], activate_profiler=options["activate_profiler"])
        runtime.name = f"torch.compile graph {self.record.index}"
        return ShapeProgram(compiled, runtime, [list(t.shape) for t in user], time.perf_counter() - start,
                            [t._version for t in static_now.values()], from_cache)

    def _cache_key(self, module: _GraphWithState, user: list, constants: dict, target: dict) -> str:
        """What the program is compiled from: the graph's code, its tensors (weights, buffers,
        constants the graph holds), its inputs' shapes and dtypes, its fixed sizes, the target."""
        key = compile_cache.Key().add("torch.compile graph", module.graph_module.code, sorted(target.items()),
                                      sorted(constants.items()), [(tuple(t.shape), t.dtype) for t in user])
        for name, tensor in sorted(module.state_dict(keep_vars=True).items()):
            key.add(name, tensor)
        return key.hexdigest()

    def _on_host(self, args):
        if not self.warned:
            self.warned = True
            warnings.warn(f"backend={BACKEND_NAME!r}: graph {self.record.index} runs on the host, not the NPU: "
                          f"{self.record.fallback_reason}", stacklevel=2)
        self.record.host_runs += 1
        return self.record.graph_module(*args)


def rbln_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None):
    """The `rbln` TorchDynamo backend (`torch.compile(model, backend="rbln", options={...})`).
    Options: npu, dtype, numerics, tensor_parallel_size (as `compile_from_torch`), device and
    activate_profiler (as `Runtime`)."""
    options = checked_options(options)
    with _LOCK:
        record = CompiledGraph(index=next(_NUMBERS), options=options, graph_module=gm)
        _GRAPHS.append(weakref.ref(record))
    return _RBLNGraphCallable(record, example_inputs)


def register() -> None:
    """Register the backend under the name "rbln" in this process, unless it is (or is about to be)
    registered: when Dynamo resolves "rbln" from the installed entry point it imports this module
    and then registers the entry point's target itself, and registers refuse a duplicate name."""
    from torch._dynamo.backends import registry

    entry_point = registry._BACKENDS.get(BACKEND_NAME)
    if BACKEND_NAME in registry._COMPILER_FNS or entry_point is not None:
        return
    registry.register_backend(rbln_backend, name=BACKEND_NAME)
