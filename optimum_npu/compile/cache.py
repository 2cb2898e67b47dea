"""The compile cache: compiled programs kept on disk, keyed by what they were compiled from, so a
second process compiles nothing.

Folder: `OPTIMUM_NPU_CACHE` (default `$XDG_CACHE_HOME/optimum_npu/compiled`, i.e.
~/.cache/optimum_npu/compiled); an entry is `<sha256 key>.rbln`, an ordinary `.rbln` artifact. The
key is the caller's description of the graph (for `torch.compile`: the Dynamo graph's code, its
weights' bytes, input shapes and dtypes) with the compile options, the package and torch versions
and the artifact format version: anything that could change the program changes the key.

An entry is read like any artifact from disk, as untrusted input (`Artifact.load` checks format,
checksums and program; the runtime validates the program again before running it). An entry that
fails, is not a regular file, or does not record the key it is stored under (a file copied from
another key) is ignored with a warning and rebuilt, never run. The folder is bounded
(`OPTIMUM_NPU_CACHE_MAX_BYTES`, default 4 GiB): after a store, the least recently used entries go
first. Only files named like our entries are ever removed. `optimum-npu cache info / clear`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import os
import re
import stat
import types
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from ..sim_device.artifact import FORMAT_VERSION, Artifact, ArtifactError, _package_version

CACHE_ENV = "OPTIMUM_NPU_CACHE"
MAX_BYTES_ENV = "OPTIMUM_NPU_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 * 1024**3
ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.rbln")
KEY_FIELD = "cache_key"   # in the artifact's `versions`: the key the entry was stored under
META_FIELD = "meta_device"  # in `versions`: "1" for a program compiled on the meta device (no weights)
PLAN_FIELD = "sharding_plan"  # in `versions`: a tensor-parallel program's plan (`ShardingPlan.to_json`)


def cache_dir() -> Path:
    folder = os.environ.get(CACHE_ENV)
    if folder:
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optimum_npu" / "compiled"


def max_bytes() -> int:
    raw = os.environ.get(MAX_BYTES_ENV)
    if raw is None:
        return DEFAULT_MAX_BYTES
    if not raw.isdigit():
        raise ValueError(f"{MAX_BYTES_ENV} must be a number of bytes (a non-negative integer), got {raw!r}")
    return int(raw)


class Key:
    """A sha256 over the parts of what a program is compiled from, and the versions it depends on."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.add("optimum_npu", _package_version(), "torch", torch.__version__, "format", FORMAT_VERSION)

    def add(self, *parts) -> Key:
        for part in parts:
            if isinstance(part, torch.Tensor):
                t = part.detach().contiguous().cpu()
                self._hash.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
                self._hash.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                text = repr(part).encode()
                self._hash.update(len(text).to_bytes(8, "little") + text)
        return self

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def add_module(self, module: torch.nn.Module) -> Key:
        """A module as torch.export would see it, without exporting it (export is most of a model's
        compile time: measured 6.8 of 7.8 s for a 4-layer Llama, so a key that needs the exported
        graph would leave a second process doing most of the work).

        What can change the traced program: the code that runs (the source file of every class of
        every object reached, whole, so module-level helpers of those files count; the versions of
        this package's source, transformers and diffusers for the helpers they call from other
        files), the values it reads (every attribute reached from the module: options, configs,
        hooks, weights' and buffers' bytes, tensors held in lists). Objects are walked through
        their `__dict__`; a value whose text shows an address (an object without a stable form) is
        keyed without the address: at worst a needless miss, never a hit for a different value. A
        class lists in `cache_key_ignores` attributes that hold process-specific values its
        forward never reads (e.g. object ids)."""
        self.add("library versions", *_library_versions())
        _Walk(self).value(module, 0)
        return self


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_DEPTH = 200         # bounds the walk (Python's recursion); a deeper module is compiled, never cached


class Uncacheable(Exception):
    """The module holds something the key cannot describe: compile it without the cache."""


@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def _code_of(obj) -> tuple[str, str]:
    """(qualified name, digest of the file that defines it) of a class or function."""
    name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    try:
        path = inspect.getsourcefile(obj)
    except (TypeError, OSError):  # a builtin (or code without a file): its name is its code
        path = None
    return name, _file_digest(path) if path else "builtin"


@functools.lru_cache(maxsize=1)
def _library_versions() -> tuple:
    """Versions of the libraries a model's code calls into, and a digest of this package's own
    source (its version string does not change while it is being developed)."""
    versions = []
    for dist in ("transformers", "diffusers"):
        try:
            versions.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            versions.append((dist, None))
    package = Path(__file__).resolve().parent.parent
    source = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        source.update(str(path.relative_to(package)).encode() + b"\0" + _file_digest(str(path)).encode())
    return (*versions, ("optimum_npu source", source.hexdigest()))


class _Walk:
    """Feeds everything reachable from one object into a key, each object once (later visits by reference)."""

    def __init__(self, key: Key):
        self.key, self.seen = key, {}

    def value(self, obj, depth: int) -> None:
        key = self.key
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                                           torch.Size, enum.Enum)):
            key.add(obj)
            return
        if isinstance(obj, torch.Tensor):
            if obj.is_meta:
                key.add("meta tensor", tuple(obj.shape), obj.dtype)
            else:
                key.add(type(obj).__name__, obj.requires_grad, obj)
            return
        if id(obj) in self.seen:
            key.add("seen", self.seen[id(obj)][0])
            return
        if depth > _MAX_DEPTH:
            raise Uncacheable(f"objects nested deeper than {_MAX_DEPTH} levels under the module")
        # the object is kept alive with its number: a temporary one (a filtered __dict__) freed during
        # the walk would otherwise leave its id to a later object, taken for this one
        self.seen[id(obj)] = (len(self.seen), obj)
        if isinstance(obj, (list, tuple)):
            key.add(type(obj).__name__, len(obj))
            for item in obj:
                self.value(item, depth + 1)
        elif isinstance(obj, (set, frozenset)):
            key.add(type(obj).__name__, sorted(_ADDRESS.sub("", repr(v)) for v in obj))
        elif isinstance(obj, dict):
            key.add(type(obj).__name__, len(obj))
            for k, v in sorted(obj.items(), key=lambda kv: repr(kv[0])):
                self.value(k, depth + 1)
                self.value(v, depth + 1)
        elif isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            key.add("code", _code_of(obj))
        elif isinstance(obj, types.MethodType):
            key.add("method", _code_of(obj.__func__), _code_of(type(obj.__self__)))
        elif isinstance(obj, functools.partial):
            key.add("partial")
            self.value((obj.func, obj.args, obj.keywords), depth + 1)
        elif callable(getattr(obj, "to_json_string", None)) and hasattr(obj, "model_type"):
            # a transformers config: its JSON, and the attention implementation that JSON leaves out
            key.add("config", _code_of(type(obj)), obj.to_json_string(use_diff=False),
                    getattr(obj, "_attn_implementation", None))
        elif hasattr(obj, "__dict__") and not isinstance(obj, types.ModuleType):
            key.add("object", *[_code_of(c) for c in type(obj).__mro__ if c is not object])
            ignored = getattr(type(obj), "cache_key_ignores", ())  # a class's own process-specific attributes
            self.value({k: v for k, v in vars(obj).items() if k not in ignored}, depth + 1)
        else:
            key.add(type(obj).__qualname__, _ADDRESS.sub("", repr(obj)))


def load(key: str):
    """The cached program of `key` (a `CompiledModel`), or None (absent, or ignored: see the docstring)."""
    from .compiler import CompiledModel

    path = cache_dir() / f"{key}.rbln"
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"compile cache: cannot read {path} ({e.strerror}); compiling instead")
        return None
    try:
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"{path} is not a regular file")
        artifact = Artifact.load(path)
        if artifact.versions.get(KEY_FIELD) != key:
            raise ArtifactError(f"{path} does not record the key it is stored under")
        plan = _plan_of(artifact)
    except (ArtifactError, OSError, ValueError) as e:
        warnings.warn(f"compile cache: ignoring entry {path.name}: {e}; compiling it again")
        return None
    try:
        os.utime(path)  # recently used: evicted last
    except OSError:
        pass
    program, tensors = artifact.program, artifact.tensors
    if artifact.versions.get(META_FIELD) == "1":  # a meta-device program: sizes and costs, no weights
        program, tensors = dataclasses.replace(program, external=[]), None
    return CompiledModel(program=program, tensors=tensors, versions=artifact.versions, sharding_plan=plan)


def _plan_of(artifact: Artifact):
    """The sharding plan an entry recorded (None for a single-device program)."""
    from .tensor_parallel.plan import ShardingPlan

    text = artifact.versions.get(PLAN_FIELD)
    if text is None:
        return None
    program = artifact.program
    shapes = {s.name: s.shape for s in program.weights + program.buffers}
    plan = ShardingPlan.from_json(text, shapes, program.tensor_shards)
    if plan.tensor_parallel_size != program.tensor_parallel_size:
        raise ValueError(f"its sharding plan is for {plan.tensor_parallel_size} devices, the program for "
                         f"{program.tensor_parallel_size}")
    return plan


def store(key: str, compiled) -> Path | None:
    """Keep `compiled` under `key` (replacing an ignored entry), then bound the folder's size. A
    cache that cannot be written is a warning, not a failure of the compilation."""
    folder = cache_dir()
    path = folder / f"{key}.rbln"
    versions = {"optimum_npu": _package_version(), "torch": torch.__version__.split("+")[0], KEY_FIELD: key}
    if getattr(compiled, "sharding_plan", None) is not None:
        versions[PLAN_FIELD] = compiled.sharding_plan.to_json()
    program, tensors = compiled.program, compiled.tensors
    if tensors is None:
        # Compiled on the meta device (e.g. a decoder's memory probe): kept without a payload, its
        # weights and buffers declared external so the artifact checks pass; `load` undoes that.
        names = [s.name for s in program.weights + program.buffers if s.name not in program.zero_init]
        program, tensors, versions[META_FIELD] = dataclasses.replace(program, external=names), {}, "1"
    try:
        if path.is_symlink():
            raise OSError(f"{path} is a symbolic link; not writing through it")
        Artifact(program=program, tensors=tensors, versions=versions).save(path)
        evict(max_bytes())
    except OSError as e:
        warnings.warn(f"compile cache: cannot store {path}: {e}")
        return None
    return path


@dataclass
class CacheInfo:
    folder: Path
    entries: int
    bytes: int
    max_bytes: int

    def __str__(self) -> str:
        from ..sim_device.stats import format_bytes

        return (f"{self.folder}: {self.entries} compiled program(s), {format_bytes(self.bytes)} "
                f"(bounded at {format_bytes(self.max_bytes)}, {MAX_BYTES_ENV})")


def _entries() -> list[tuple[Path, os.stat_result]]:
    folder = cache_dir()
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if ENTRY_NAME.fullmatch(path.name):
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((path, st))
    return found


def info() -> CacheInfo:
    entries = _entries()
    return CacheInfo(cache_dir(), len(entries), sum(st.st_size for _, st in entries), max_bytes())


def evict(limit: int) -> int:
    """Remove least recently used entries until the folder holds at most `limit` bytes; returns how many went."""
    entries = sorted(_entries(), key=lambda e: e[1].st_mtime)
    total, removed = sum(st.st_size for _, st in entries), 0
    for path, st in entries:
        if total <= limit:
            break
        path.unlink(missing_ok=True)
        total -= st.st_size
        removed += 1
    return removed


def clear() -> int:
    """Remove every entry (only files named like entries); returns how many."""
    return evict(-1)
