"""The simulated NPU's view of serving, as Prometheus metrics beside vLLM's own.

vLLM's metrics time the host running the simulator; these time the NPU it simulates
(`serving_clock.ServingClock`). Per request: the simulated queue time, time to first token and
time per output token (histograms). Per device: memory in use and its capacity, busy time, and
utilisation (busy / elapsed simulated time, since the engine started).

They are registered with prometheus_client in the process that runs the model (vLLM's engine
core). vLLM's /metrics is served by its API server process, which reads other processes'
metrics only in prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set before
either process imports prometheus_client): `optimum-npu serve` sets it, as vLLM itself does
when it runs several API servers. An engine in the caller's process (`vllm.LLM` with
VLLM_ENABLE_V1_MULTIPROCESSING=0) registers them in the default registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "optimum_npu:"
# Simulated latencies of small test models are microseconds, of large ones seconds.
LATENCY_BUCKETS = tuple(m * 10.0**e for e in range(-6, 2) for m in (1, 2.5, 5)) + (100.0,)

_metrics: dict | None = None


def _registered() -> dict:
    """The metric objects, created once per process (a second engine in the same process, e.g.
    in tests, adds its own label values to them)."""
    global _metrics
    if _metrics is None:
        model = ["model_name"]
        device = ["model_name", "device", "npu"]
        _metrics = {
            "queue": Histogram(f"{PREFIX}simulated_queue_time_seconds",
                               "Simulated time a request waited before its first step on the NPU",
                               model, buckets=LATENCY_BUCKETS),
            "ttft": Histogram(f"{PREFIX}simulated_time_to_first_token_seconds",
                              "Simulated time from a request's arrival to its first token on the NPU",
                              model, buckets=LATENCY_BUCKETS),
            "tpot": Histogram(f"{PREFIX}simulated_time_per_output_token_seconds",
                              "Simulated mean time per output token after the first, per request",
                              model, buckets=LATENCY_BUCKETS),
            "busy": Counter(f"{PREFIX}device_busy_seconds",
                            "Simulated seconds the device ran compiled graphs", device),
            "elapsed": Counter(f"{PREFIX}simulated_elapsed_seconds",
                               "Simulated seconds since the engine started (busy and idle)", model),
            "utilisation": Gauge(f"{PREFIX}device_utilization",
                                 "Device busy time / simulated elapsed time since the engine started", device,
                                 multiprocess_mode="mostrecent"),
            "memory": Gauge(f"{PREFIX}device_memory_used_bytes",
                            "Device memory held by the model (weights, KV cache and other buffers, activations)",
                            device, multiprocess_mode="mostrecent"),
            "capacity": Gauge(f"{PREFIX}device_memory_capacity_bytes", "Usable device memory", device,
                              multiprocess_mode="mostrecent"),
        }
    return _metrics


class DeviceMetrics:
    """The metrics of one served model on its devices."""

    def __init__(self, model_name: str, memory: list):
        """memory: the model's `DeviceMemoryUsage` per device (fixed once it is loaded)."""
        self._m = _registered()
        self._model = model_name
        self._devices = [(str(m.device), m.npu) for m in memory]
        for m, (device, npu) in zip(memory, self._devices):
            self._m["memory"].labels(model_name, device, npu).set(m.total_bytes)
            self._m["capacity"].labels(model_name, device, npu).set(m.capacity_bytes)
        self._busy_s = self._elapsed_s = 0.0

    def step(self, busy_s: float, elapsed_s: float) -> None:
        """After a step: the devices' busy time and the simulated time since the engine started.
        Every graph of the model runs on all its devices (tensor parallelism), so they are busy
        together."""
        busy_delta, elapsed_delta = busy_s - self._busy_s, elapsed_s - self._elapsed_s
        self._busy_s, self._elapsed_s = busy_s, elapsed_s
        self._m["elapsed"].labels(self._model).inc(elapsed_delta)
        for device, npu in self._devices:
            self._m["busy"].labels(self._model, device, npu).inc(busy_delta)
            self._m["utilisation"].labels(self._model, device, npu).set(busy_s / elapsed_s if elapsed_s > 0 else 0.0)

    def request(self, queue_s: float, ttft_s: float, tpot_s: float | None) -> None:
        """A finished request's simulated times (tpot None: fewer than two output tokens)."""
        self._m["queue"].labels(self._model).observe(queue_s)
        self._m["ttft"].labels(self._model).observe(ttft_s)
        if tpot_s is not None:
            self._m["tpot"].labels(self._model).observe(tpot_s)
