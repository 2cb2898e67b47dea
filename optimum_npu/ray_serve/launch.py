"""Start the application on Ray and wait, boundedly, until it serves (or say why it cannot).

`optimum-npu serve FOLDER --replicas N` runs here: it joins the Ray cluster `RAY_ADDRESS` names
or starts a local one whose `RBLN` resources are the simulated machine's devices, checks that
the replicas' device groups fit, deploys, and waits until every replica's engine is up. A
replica that fails at start (a model that does not fit its devices, a bad vLLM option) fails
the deployment with its own message, which is raised here.
"""

from __future__ import annotations

import os
import time

from .app import RESOURCE

APP_NAME = "optimum-npu"
START_TIMEOUT_S = 900.0   # vLLM's engine start is about a minute per replica on two busy cores
POLL_S = 2.0


def start_ray(num_cpus: int | None = None):
    """Join the cluster RAY_ADDRESS names, else start a local Ray instance (loopback only) whose
    RBLN resources are this simulated machine's devices."""
    import ray

    from ..quiet import dropping
    from ..sim_device.memory import devices

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
        return
    # Ray asks the NPU driver (`rebel`) for the node's NPU type and logs a traceback at ERROR when
    # it is missing, as it always is for simulated devices; nothing a user can act on.
    with dropping("ray._private.accelerators.rbln", "Failed to detect RBLN NPU type"):
        # address="local": a new instance even where `ray start` left one on this machine.
        ray.init(address="local", num_cpus=num_cpus or max(2, os.cpu_count() or 1), include_dashboard=False,
                 resources={RESOURCE: len(devices())}, _node_ip_address="127.0.0.1")


def check_devices(replicas: int, tensor_parallel_size: int) -> None:
    """ValueError when the cluster has fewer RBLN devices than the replicas' groups need."""
    import ray

    have = int(ray.cluster_resources().get(RESOURCE, 0))
    need = replicas * tensor_parallel_size
    if need > have:
        raise ValueError(
            f"{replicas} replica(s) of a model compiled with tensor_parallel_size={tensor_parallel_size} need {need} "
            f"{RESOURCE} devices; the Ray cluster has {have} (a local instance has the simulated machine's devices: "
            f"set OPTIMUM_NPU_SYSTEM, e.g. RBLN-CA25x{-(-need // 4)})"
        )


def deploy(application, timeout_s: float = START_TIMEOUT_S, name: str = APP_NAME) -> None:
    """Deploy and wait until the application runs; RuntimeError with Serve's message if it failed
    to deploy, TimeoutError if it is not up within timeout_s."""
    from ray import serve

    # serve.run waits without a bound; `_run(_blocking=False)` deploys and returns, then we wait.
    serve._run(application, _blocking=False, name=name)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        state = str(status.status) if status is not None else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
            details = [f"{d}: {_summary(s.message)}" for d, s in status.deployments.items() if s.message]
            raise RuntimeError(f"the application failed to deploy: {' | '.join(details) or status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the application is not running after {timeout_s:.0f} s (state {state})")
        time.sleep(POLL_S)


def _summary(message: str) -> str:
    """Serve's message for a failed deployment, without the replica's traceback: its first line
    and the exception the traceback ends with (e.g. the simulator's DeviceMemoryError)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 2 or not any(line.startswith("Traceback") or line.startswith("File ") for line in lines):
        return " ".join(lines)
    return f"{lines[0]} {lines[-1]}"
