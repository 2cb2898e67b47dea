"""`optimum-npu serve FOLDER --replicas N [--router NAME] [--host H] [--port P] [vLLM options]`:
N vLLM engines on their own simulated device groups behind one OpenAI endpoint, on Ray Serve.

Without --replicas, `optimum-npu serve` is vLLM's own single server (cli.py). With it, the
options it names are taken out and the rest go to every replica's vLLM engine unchanged.
The endpoint listens on 127.0.0.1:8000 unless told otherwise. It runs until interrupted
(Ctrl-C or SIGTERM), then shuts the application and a Ray instance it started down.
"""

from __future__ import annotations

import signal
import threading

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class ServeOptionError(ValueError):
    """A serve option is missing its value or has a bad one."""


def pop_option(argv: list[str], name: str) -> str | None:
    """The value of `name VALUE` or `name=VALUE` in argv (removed from it); None when absent."""
    for i, token in enumerate(argv):
        if token == name:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ServeOptionError(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if token.startswith(name + "="):
            del argv[i]
            return token.split("=", 1)[1]
    return None


def _whole(name: str, text: str, minimum: int, maximum: int) -> int:
    if not text.isdigit() or not minimum <= int(text) <= maximum:
        raise ServeOptionError(f"{name}={text!r}: expected a whole number from {minimum} to {maximum}")
    return int(text)


def serve_replicas(folder: str, argv: list[str]) -> int:
    """Run the Ray Serve application until interrupted; argv holds --replicas and the rest."""
    from .ray_serve.routers import ROUTERS

    argv = list(argv)
    replicas = _whole("--replicas", pop_option(argv, "--replicas"), 1, 4096)
    router = pop_option(argv, "--router") or "least-loaded"
    if router not in ROUTERS:
        raise ServeOptionError(f"--router={router!r}: expected one of {', '.join(ROUTERS)}")
    host = pop_option(argv, "--host") or DEFAULT_HOST
    port = _whole("--port", pop_option(argv, "--port") or str(DEFAULT_PORT), 1, 65535)

    import ray
    from ray import serve

    from .ray_serve.app import build_app
    from .ray_serve.launch import check_devices, deploy, start_ray
    from .vllm.folder import CompiledDecoder

    compiled = CompiledDecoder.read(folder)
    application = build_app(folder, replicas=replicas, router=router, vllm_args=argv)
    started_here = not ray.is_initialized()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    start_ray()
    try:
        check_devices(replicas, compiled.tensor_parallel_size)
        serve.start(http_options={"host": host, "port": port})
        deploy(application)
        print(f"serving {folder} with {replicas} replica(s) ({router} routing) on http://{host}:{port}/v1", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        if started_here:
            ray.shutdown()
    return 0
