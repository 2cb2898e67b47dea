"""The Ray Serve application: N engine replicas on their own simulated device groups, one endpoint.

    from optimum_npu.ray_serve.app import build_app
    serve.run(build_app("compiled_llama", replicas=2, router="prefix-aware"))

or, with Ray's CLI on a cluster whose nodes declare their NPUs as `RBLN` resources
(`ray start --head --resources '{"RBLN": 4}'`):

    serve run optimum_npu.ray_serve.app:app_builder folder=compiled_llama replicas=2 router=prefix-aware

Each engine replica asks Ray for as many `RBLN` resources as the folder's tensor-parallel size
(the model's devices); Ray gives each replica its own device ids (RBLN_DEVICES) and places
replicas on whichever node has them, so a cluster of several machines needs only Ray's own setup.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray import serve
from ray.serve.config import RequestRouterConfig

from ..vllm.folder import CompiledDecoder
from .engine import NPUEngine
from .ingress import OpenAIIngress
from .routers import ROUTERS, router_class

RESOURCE = "RBLN"  # Ray's name for Rebellions NPUs (ray/_private/accelerators/rbln.py)
DEFAULT_ROUTER = "least-loaded"
# Requests a replica takes before the router looks elsewhere: vLLM queues what exceeds the
# compiled batch itself, so this only bounds how far one replica's queue runs ahead.
MAX_ONGOING_PER_SEQ = 4


def build_app(folder: str, replicas: int = 1, router: str = DEFAULT_ROUTER, vllm_args: Sequence[str] = (),
              engine_cpus: float = 1.0):
    """The application serving the compiled decoder `folder` with `replicas` vLLM engines behind
    one OpenAI endpoint; `vllm_args` are `vllm serve` options for every engine (--max-num-seqs,
    --served-model-name, --enable-prefix-caching, ...). ValueError for what cannot run."""
    compiled = CompiledDecoder.read(folder)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a whole number of at least 1; got {replicas!r}")
    router_cls = router_class(router)
    vllm_args = [str(a) for a in vllm_args]
    for option in ("--model", "--host", "--port"):
        if option in vllm_args:
            raise ValueError(f"{option} is set by the application (the folder, and one endpoint for all replicas); "
                             f"drop it from the vLLM options")
    engine = serve.deployment(NPUEngine, name="NPUEngine").options(
        num_replicas=replicas,
        ray_actor_options={"num_cpus": engine_cpus, "resources": {RESOURCE: compiled.tensor_parallel_size}},
        max_ongoing_requests=MAX_ONGOING_PER_SEQ * compiled.batch_size,
        request_router_config=RequestRouterConfig(request_router_class=router_cls),
        health_check_period_s=10, health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,
    )
    return OpenAIIngress.bind(engine.bind(["--model", str(folder), *vllm_args]))


def app_builder(args: dict):
    """`serve run optimum_npu.ray_serve.app:app_builder folder=DIR [replicas=N] [router=NAME]
    [vllm_args="--max-num-seqs 4 ..."]`: Ray's CLI hands the key=value pairs here as strings."""
    known = {"folder", "replicas", "router", "vllm_args"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}: expected {', '.join(sorted(known))}")
    if "folder" not in args:
        raise ValueError("folder=DIR is required: a compiled decoder folder")
    text = str(args.get("replicas", 1))
    if not text.isdigit():
        raise ValueError(f"replicas={text!r}: expected a whole number of at least 1")
    return build_app(args["folder"], replicas=int(text), router=str(args.get("router", DEFAULT_ROUTER)),
                     vllm_args=str(args.get("vllm_args", "")).split())


__all__ = ["ROUTERS", "build_app", "app_builder"]
