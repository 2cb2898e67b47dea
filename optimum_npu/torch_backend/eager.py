"""The eager `rbln` torch device: `torch.randn(4, 4, device="rbln")`, `x.to("rbln")`, `.cpu()`,
`model.to("rbln")`, each op run on the simulated device (`eager_device.EagerDevice`).

Pure Python, through torch's PrivateUse1 backend: `torch.utils.backend_registration.
_setup_privateuseone_for_python_backend` renames the key to "rbln", generates the `.rbln()` /
`is_rbln` methods, registers the `torch.rbln` device module and the Python hooks and device
guard a backend needs; one boxed kernel registered with `torch.library` as the PrivateUse1
fallback then receives every aten op on an rbln tensor that torch does not already implement for
every backend (torch's CompositeImplicit / CompositeExplicit ops decompose into those first).

Where the values live: an rbln tensor is a real PrivateUse1 tensor (`torch._C._acc.
create_empty_tensor`) whose storage holds no bytes; its values are a flat host tensor in the
device's numerics attached to the Python object of that storage (`storage.rbln_data`). torch
keeps a storage's Python object alive as long as the storage lives, so views, `detach`,
`nn.Parameter` and `param.data = ...` (which make new tensor objects on the same storage) all
find the values, and a finalizer on the storage object returns the device memory when the last
tensor using it is gone. View ops (`view`, `as_strided`, ...) only change sizes and strides:
they run torch's own CPU view kernels, which are device-agnostic, on the rbln tensor.

Every other op: run on the host tensors in the device numerics if the device runs it (the
compiler's op table, `compile.op_support`), priced as one kernel; otherwise in fp32 on the host
with a one-time warning naming the op, priced with the copies there and back. The output's
sizes and dtype come from running the op on meta tensors of the user's dtypes.

One `rbln` device per process (`rbln` / `rbln:0`), mapped to a device of the simulated machine
by `configure(device=...)`.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ..compile.op_support import Category, categorize, count_work
from .eager_device import EagerDevice, EagerSettings

DEVICE_TYPE = "rbln"
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
# Ops that only read sizes / strides or make a view: torch's CPU kernels work on any device's tensors.
_VIEW_OPS = {"aten::view", "aten::as_strided", "aten::set_", "aten::_reshape_alias", "aten::unfold", "aten::view_as_real",
             "aten::view_as_complex", "aten::_unsafe_view"}
# Scaled dot-product attention's backend choice: the math path (matmul, softmax), whose ops the device runs.
_SDPA_MATH = 0

_state_lock = threading.Lock()
_device: EagerDevice | None = None
_settings = EagerSettings()
_warned: set[str] = set()
_library = None


def configure(**settings) -> None:
    """Set the eager device's npu, dtype ("bfloat16" / "float16"), numerics ("device" / "exact"),
    device (index on the simulated machine) and activate_profiler; before its first tensor."""
    global _settings
    unknown = sorted(set(settings) - set(EagerSettings.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; the settings are: "
                         f"{', '.join(EagerSettings.__dataclass_fields__)}")
    with _state_lock:
        if _device is not None and _device.bytes_in_use:
            raise RuntimeError("configure the rbln device before creating tensors on it "
                               f"({_device.bytes_in_use} bytes are held by live rbln tensors)")
        new = EagerSettings(**{**_settings.__dict__, **settings}).checked()
        _settings = new
        _reset_device()


def _reset_device() -> None:
    global _device
    if _device is not None:
        _device.close()
    _device = None


def device() -> EagerDevice:
    """The simulated device behind "rbln" (created on first use)."""
    global _device
    with _state_lock:
        if _device is None:
            _device = EagerDevice(_settings)
        return _device


class _DeviceModule:
    """`torch.rbln`: what torch asks a backend's device module, and the simulated device's figures."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def _is_in_bad_fork() -> bool:
        return False

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        pass  # random numbers are drawn by the host's generator (seeded by torch.manual_seed)

    @staticmethod
    def synchronize(device=None) -> None:
        pass  # every op has completed when it returns

    @staticmethod
    def memory_allocated(device=None) -> int:
        return _device.bytes_in_use if _device is not None else 0

    @staticmethod
    def max_memory_allocated(device=None) -> int:
        return _device.peak_bytes if _device is not None else 0

    @staticmethod
    def stats():
        """Simulated time of the ops run so far (`RuntimeStats`)."""
        return globals()["device"]().stats

    configure = staticmethod(configure)


def enable() -> bool:
    """Make "rbln" a torch device (once per process). False, with a warning, if another backend
    already took PrivateUse1."""
    global _library
    with _state_lock:
        if _library is not None:
            return True
        current = torch._C._get_privateuse1_backend_name()
        if current not in ("privateuseone", DEVICE_TYPE):
            warnings.warn(f"PrivateUse1 is already the {current!r} backend: the eager rbln device is not available")
            return False
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        if current == "privateuseone":
            _setup_privateuseone_for_python_backend(DEVICE_TYPE, backend_module=_DeviceModule())
        library = torch.library.Library("_", "IMPL")
        library.fallback(_kernel, "PrivateUse1")
        _library = library
        return True


# ---- the kernel ---------------------------------------------------------------------------

def _is_rbln(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == DEVICE_TYPE


def _data(t: torch.Tensor) -> torch.Tensor:
    """The host view of an rbln tensor's values (device numerics)."""
    flat = getattr(t.untyped_storage(), "rbln_data", None)
    if flat is None:
        raise RuntimeError("this rbln tensor has no values (it was not made by the rbln device)")
    return flat.as_strided(t.shape, t.stride(), t.storage_offset())


def _new_tensor(values: torch.Tensor, dtype: torch.dtype, dev: EagerDevice, what: str) -> torch.Tensor:
    """A new rbln tensor of `dtype` holding `values` (a host tensor, stored in the device numerics)."""
    return _hold(torch._C._acc.create_empty_tensor([0], dtype), values.shape, lambda: values, dev, what)


def _hold(tensor: torch.Tensor, shape, make_values, dev: EagerDevice, what: str) -> torch.Tensor:
    """Point rbln tensor `tensor` at a new storage of `shape` holding `make_values()` (a host
    tensor), made only once the device memory is reserved (a tensor too large fails first)."""
    dtype, numel = tensor.dtype, math.prod(shape)
    nbytes = dev.storage_bytes(numel, dtype)
    dev.allocate(nbytes, f"{what} {list(shape)} {str(dtype).removeprefix('torch.')}")
    try:
        values = make_values()
        values = values.to(dev.compute_dtype if dtype.is_floating_point else dtype)
        flat = values.contiguous().reshape(-1).clone()
        # A storage of the tensor's size with no host bytes behind it (address 0): torch's view
        # kernels check sizes against it; the values live beside it, in `rbln_data`.
        storage = torch._C._construct_storage_from_data_pointer(
            0, torch.device(DEVICE_TYPE, 0), numel * dtype.itemsize)
        storage.rbln_data = flat
        weakref.finalize(storage, dev.release, nbytes)
    except BaseException:
        dev.release(nbytes)
        raise
    return tensor.set_(storage, 0, tuple(shape), torch._prims_common.make_contiguous_strides_for(shape))


def _to_meta(x):
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if isinstance(x, torch.device) and x.type == DEVICE_TYPE:
        return torch.device("meta")
    return x


def _host_device(x, compute_dtype=None):
    if isinstance(x, torch.device) and x.type == DEVICE_TYPE:
        return torch.device("cpu")
    if compute_dtype is not None and isinstance(x, torch.dtype) and x.is_floating_point:
        return compute_dtype  # the device computes a requested float type in its own
    return x


def _written(op, args: tuple, kwargs: dict, values: tuple[tuple, dict]) -> list:
    """The entries of `values` (args, kwargs laid out as `args`, `kwargs`) the op writes: in-place and out= arguments."""
    found = []
    for i, a in enumerate(op._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            if i < len(args):
                found.append(values[0][i])
            elif a.name in kwargs:
                found.append(values[1][a.name])
    return found


def _bytes(tensors, dev: EagerDevice) -> int:
    return sum(dev.storage_bytes(t.numel(), t.dtype) for t in tensors)


def _warn_host(target: str) -> None:
    if target not in _warned:
        _warned.add(target)
        warnings.warn(f"{target} is not supported by the rbln device: it runs on the host (fp32) with copies "
                      "to and from the device (warned once per op)", stacklevel=3)


def _category(target: str) -> Category | None:
    """How the device runs op `target` (an in-place op as its out-of-place form); None: it does not."""
    for name in (target, _out_of_place(target)):
        try:
            category = categorize(name)
        except ValueError:
            continue
        return None if category is Category.HOST else category
    return None


def _out_of_place(target: str) -> str:
    """`aten.add_.Tensor` -> `aten.add.Tensor`, `aten._softmax.out` -> `aten.softmax.out`: the form the
    op table lists (the compiler sees torch.export's ops, eager sees what they decompose into)."""
    ns, packet, overload = (target.split(".") + ["default"])[:3]
    return f"{ns}.{packet.strip('_')}.{overload}"


def _kernel(op, *args, **kwargs):
    name = op._schema.name  # without the overload
    if name in _VIEW_OPS:
        return op.redispatch(_CPU, *args, **kwargs)
    dev = device()
    with dev.call(str(op)):
        return _device_op(op, name, dev, args, kwargs)


def _device_op(op, name: str, dev: EagerDevice, args: tuple, kwargs: dict):
    if name == "aten::_copy_from":
        return _copy_from(dev, *args, **kwargs)
    if name == "aten::_fused_sdp_choice":
        return _SDPA_MATH
    if name == "aten::_local_scalar_dense":
        (t,) = args
        dev.copy("item", dev.storage_bytes(1, t.dtype), to_device=False)
        return _data(t).to(t.dtype).item()
    if name in ("aten::empty", "aten::empty_strided"):
        _check_index(kwargs.get("device"))
        dtype, shape = kwargs.get("dtype") or torch.get_default_dtype(), tuple(args[0])
        return _hold(torch._C._acc.create_empty_tensor([0], dtype), shape, lambda: torch.empty(shape, dtype=dtype),
                     dev, "empty")
    return _run(op, dev, args, kwargs)


def _check_index(device_arg) -> None:
    if device_arg is not None and torch.device(device_arg).index not in (None, 0):
        raise ValueError(f"there is one rbln device per process, 'rbln' (or 'rbln:0'), not {str(device_arg)!r}; "
                         "choose which simulated device it is with optimum_npu.torch_backend.configure(device=N)")


def _copy_from(dev: EagerDevice, src: torch.Tensor, dst: torch.Tensor, non_blocking: bool = False):
    nbytes = dev.storage_bytes(src.numel(), dst.dtype if _is_rbln(dst) else src.dtype)
    if not _is_rbln(src):
        _data(dst).copy_(dev.to_device(src.to(dst.dtype)) if dst.dtype.is_floating_point else src)
        dev.copy("copy to rbln", nbytes, to_device=True)
    elif not _is_rbln(dst):
        dst.copy_(_data(src).to(src.dtype))
        dev.copy("copy to host", nbytes, to_device=False)
    else:
        _data(dst).copy_(dev.round(_data(src)) if not dst.dtype.is_floating_point else _data(src))
        dev.kernel("copy_", 0.0, 0.0, 2 * nbytes, 0)
    return dst


def _run(op, dev: EagerDevice, args: tuple, kwargs: dict):
    target = str(op)
    meta_args, meta_kwargs = tree_map(_to_meta, (args, kwargs))
    try:
        meta_out = op(*meta_args, **meta_kwargs)
    except (NotImplementedError, RuntimeError):
        meta_out = None  # an output size that depends on the values (masked_select, nonzero): from the result
    rbln_in = [t for t in tree_flatten((args, kwargs))[0] if _is_rbln(t)]
    category = _category(target)
    written = [t for t in _written(op, args, kwargs, (args, kwargs)) if _is_rbln(t)]
    for t, m in zip(written, _written(op, args, kwargs, (meta_args, meta_kwargs))):
        if meta_out is not None and t.shape != m.shape:  # an out= tensor the op resizes
            _hold(t, m.shape, lambda: torch.zeros(m.shape, dtype=t.dtype), dev, f"{target} out")
    if category is not None:
        host_args, host_kwargs = tree_map(lambda x: _data(x) if _is_rbln(x) else _host_device(x, dev.compute_dtype),
                                          (args, kwargs))
        out = op(*host_args, **host_kwargs)
        if dev.round_to is not None:
            for t in written:
                if t.dtype.is_floating_point:
                    _data(t).copy_(dev.round(_data(t)))
            out = tree_map(lambda o: dev.round(o) if isinstance(o, torch.Tensor) else o, out)
    else:
        _warn_host(target)
        # fp32 copies of the device values; what the op writes in place is copied back
        host_args, host_kwargs = tree_map(
            lambda x: (_data(x).to(x.dtype) if x.dtype.is_floating_point else _data(x).clone()) if _is_rbln(x)
            else _host_device(x), (args, kwargs))
        out = op(*host_args, **host_kwargs)
        for t, host in zip(written, _written(op, args, kwargs, (host_args, host_kwargs))):
            _data(t).copy_(dev.to_device(host))
    if meta_out is None:
        float_in = next((t.dtype for t in rbln_in if t.dtype.is_floating_point), torch.get_default_dtype())
        meta_out = tree_map(lambda o: torch.empty(o.shape, dtype=float_in if o.is_floating_point() else o.dtype,
                                                  device="meta") if isinstance(o, torch.Tensor) else o, out)
    outputs = _wrap_outputs(op, dev, written, out, meta_out)
    out_tensors = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor)]
    if category is not None:
        work = count_work(target, category, meta_args, meta_out)
        dev.kernel(target, work.flops, work.vector_flops, _bytes(rbln_in, dev) + _bytes(out_tensors, dev), work.rows)
        dev.op_counts[target, "device"] += 1
    else:
        dev.op_counts[target, "host"] += 1
        dev.host_op(target, float(sum(t.numel() for t in out_tensors)), _bytes(rbln_in, dev), _bytes(out_tensors, dev))
    return outputs


def _wrap_outputs(op, dev: EagerDevice, written: list, out, meta_out):
    """The op's host results as rbln tensors: an argument it wrote is returned as itself."""
    returns = op._schema.returns
    if written and returns and all(r.alias_info is not None for r in returns):
        return written[0] if len(returns) == 1 else tuple(written[:len(returns)])
    if isinstance(meta_out, torch.Tensor):
        return _new_tensor(out, meta_out.dtype, dev, str(op))
    if isinstance(meta_out, (tuple, list)):
        return type(meta_out)(_new_tensor(o, m.dtype, dev, str(op)) if isinstance(m, torch.Tensor) else o
                              for o, m in zip(out, meta_out))
    return out
