"""One replica: a vLLM engine on a compiled folder with vLLM's OpenAI server app, called in-process.

The replica builds what `vllm serve` builds (its argument parser, `AsyncLLM`, `build_app`,
`init_app_state`), so every endpoint, its validation and its errors are vLLM's; it only has no
socket of its own. The ingress hands it a request (method, path, headers, body) and the replica
runs vLLM's ASGI app on it, yielding the response start (status, headers) and then the body
chunks as they come (streams stay streams). When the caller goes away (client disconnect,
ingress cancellation), vLLM's app is told the client disconnected, so it aborts the request and
frees its KV blocks as it would behind its own socket.

Ray runs the replica with `RBLN_DEVICES` set to the device ids it assigned (the `RBLN` resources
the replica asked for); the engine's model runner loads the compiled model on them
(optimum_npu/vllm/devices.py).
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import AsyncIterator

# How long a response may stay silent before the replica gives up on it (an engine that stopped
# answering must end the request with an error, not hang the client).
RESPONSE_IDLE_TIMEOUT_S = 600.0


def explain_start_failure(folder: str) -> None:
    """Raise the memory error behind a failed engine start, if that was the cause.

    vLLM reports a failed start as "Engine core initialization failed. See root cause above",
    the cause only in the engine process's log, and Ray Serve would show just that sentence. The
    usual cause here is a model that does not fit its devices (other runtimes hold them, or the
    folder's KV pool is too large): loading it in this process on the same devices (the failed
    engine's memory went with its process) raises that message. Runs on failure only."""
    from ..sim_device.memory import DeviceMemoryError
    from ..vllm.devices import load_on_assigned_devices

    try:
        model = load_on_assigned_devices(folder)
    except DeviceMemoryError as err:
        raise DeviceMemoryError(f"the engine replica cannot load {folder}: {err}") from None
    except Exception:
        return  # not a memory problem: the caller re-raises vLLM's own error
    model.close()


class NPUEngine:
    """A Ray Serve deployment class (decorated by app.build_app): vLLM's OpenAI server in-process."""

    async def __init__(self, vllm_args: list[str]):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app
        from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        args = make_arg_parser(FlexibleArgumentParser()).parse_args(vllm_args)
        validate_parsed_serve_args(args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        try:
            self.engine = AsyncLLM.from_vllm_config(
                vllm_config=config, usage_context=UsageContext.OPENAI_API_SERVER,
                enable_log_requests=engine_args.enable_log_requests, disable_log_stats=engine_args.disable_log_stats,
            )
        except Exception:
            explain_start_failure(args.model)
            raise
        tasks = await self.engine.get_supported_tasks()
        self.app = build_app(args, tasks, self.engine.model_config)
        await init_app_state(self.engine, self.app.state, args, tasks)
        # vLLM's handler of a dead engine flips `should_exit` on the uvicorn server it would run
        # under; there is none here (Ray restarts the replica through check_health instead).
        self.app.state.server = types.SimpleNamespace(should_exit=False)

    async def check_health(self) -> None:
        """Ray Serve's health check: raises once the engine is dead, so Ray replaces the replica."""
        await self.engine.check_health()

    async def simulated_timings(self) -> dict:
        """{"replica": this replica's id, "timings": the simulated device timing of the requests
        it finished, oldest first (dicts with ttft_s, tpot_s, output_tokens, ...), read from the
        engine's workers}."""
        from ray import serve

        per_worker = await self.engine.collective_rpc("simulated_timings")
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "timings": [t for worker in per_worker for t in worker]}

    async def __call__(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                       query: bytes = b"", routing_key: str | None = None) -> AsyncIterator:
        """vLLM's response to one HTTP request: first ("start", status, headers), then the body
        chunks (bytes). `routing_key` is for the request router only."""
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
        }
        sent = asyncio.Queue()
        disconnected = asyncio.Event()
        request_read = False

        async def receive():
            nonlocal request_read
            if not request_read:
                request_read = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await sent.put(message)

        task = asyncio.create_task(self.app(scope, receive, send))
        task.add_done_callback(lambda _: sent.put_nowait(None))
        try:
            while True:
                message = await asyncio.wait_for(sent.get(), timeout=RESPONSE_IDLE_TIMEOUT_S)
                if message is None:  # the app returned (or raised) without finishing the response
                    task.result()
                    return
                if message["type"] == "http.response.start":
                    yield ("start", message["status"], list(message.get("headers", [])))
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body", False):
                        return
        finally:
            disconnected.set()  # the caller left or the response ended: vLLM aborts what is left
            if not task.done():
                try:
                    await asyncio.wait_for(task, timeout=30)
                except (asyncio.TimeoutError, Exception):
                    task.cancel()
