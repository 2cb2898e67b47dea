"""Request routers on a shared-prefix workload, two replicas on Ray Serve: round-robin, least-loaded, prefix-aware.

    python benchmarks/ray_routing.py [--groups 12] [--per-group 6] [--suffix-len 64] [--output-len 8] [--clients 4]

A tiny random Llama (`optimum_npu.testing.build_tiny_random_llama`) is compiled with flash
attention (max_seq_len 8192, KV blocks of 4096 tokens, 512-token prefill chunks, 24 KV blocks,
batch 4). vLLM's prefix cache keeps whole blocks only, and the compiled graphs fix a block at
one 4096-token partition, so a prefix is reused only when it covers a whole block: each request
is a group's shared 4096-token prefix and its own suffix (`--suffix-len` tokens). The requests
of all groups, in a seeded random order, are sent by a closed loop of `--clients` users through
the `openai` client to one endpoint in front of two replicas (one local Ray instance, loopback
only), once per router, each time on freshly started replicas (cold caches, clocks at zero).

Printed per router:
- prefix-cache hit rate: prompt tokens served from the cache over all prompt tokens (vLLM's
  `usage.prompt_tokens_details.cached_tokens`, one request at a time);
- simulated TTFT (median, mean, p90): on the replica's simulated device clock, from the step that
  first scheduled the request to the step that sampled its first token (host time and the
  time a request waits before vLLM schedules it are not in it);
- simulated throughput: output tokens over the longest replica's device time for the run
  (the replicas run side by side; each one's device clock moves only while its steps run);
- wall time of the run on this machine (host compute, not the NPU's).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROUTERS = ("round-robin", "least-loaded", "prefix-aware")
PREFIX_LEN = 4096         # one KV block: the smallest prefix vLLM's cache can reuse here
BATCH, MAX_SEQ_LEN, CHUNK, NUM_BLOCKS = 4, 8192, 512, 24
NAME = "tiny"
REPLICAS = 2
REQUEST_TIMEOUT_S = 600


def compile_folder(root: Path) -> Path:
    from optimum_npu import RBLNAutoModelForCausalLM
    from optimum_npu.testing.llama import build_tiny_random_llama

    source = build_tiny_random_llama(root / "source", max_position_embeddings=MAX_SEQ_LEN)
    model = RBLNAutoModelForCausalLM.from_pretrained(
        str(source), export=True, rbln_batch_size=BATCH, rbln_max_seq_len=MAX_SEQ_LEN,
        rbln_kvcache_partition_len=PREFIX_LEN, rbln_prefill_chunk_size=CHUNK, rbln_kvcache_num_blocks=NUM_BLOCKS,
        rbln_create_runtimes=False)
    model.save_pretrained(root / "compiled")
    return root / "compiled"


def workload(groups: int, per_group: int, suffix_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(PREFIX_LEN)] for _ in range(groups)]
    prompts = [p + [rng.randrange(3, vocab) for _ in range(suffix_len)] for p in prefixes for _ in range(per_group)]
    rng.shuffle(prompts)
    return prompts


def replica_timings(app_name: str, replicas: int, attempts: int = 40) -> dict[str, list[dict]]:
    """Each replica's finished-request timings (the handle's router picks the replica; asked
    until every replica answered, at most `attempts` times)."""
    from ray import serve

    handle = serve.get_deployment_handle("NPUEngine", app_name=app_name)
    seen: dict[str, list[dict]] = {}
    for _ in range(attempts):
        report = handle.simulated_timings.remote().result(timeout_s=120)
        seen[report["replica"]] = report["timings"]
        if len(seen) == replicas:
            break
    return seen


def run(folder: Path, router: str, prompts: list[list[int]], output_len: int, clients: int, port: int) -> dict:
    import openai
    from ray import serve

    from optimum_npu.ray_serve.app import build_app
    from optimum_npu.ray_serve.launch import APP_NAME, deploy

    deploy(build_app(str(folder), replicas=REPLICAS, router=router,
                     vllm_args=["--served-model-name", NAME, "--max-num-seqs", str(BATCH),
                                "--enable-prompt-tokens-details"]))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S,
                           max_retries=0)

    def one(prompt):
        done = client.completions.create(model=NAME, prompt=prompt, max_tokens=output_len, temperature=0.0,
                                         extra_body={"ignore_eos": True})
        details = done.usage.prompt_tokens_details
        return done.usage.prompt_tokens, (details.cached_tokens or 0) if details else 0, done.usage.completion_tokens

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        usage = list(pool.map(one, prompts, timeout=REQUEST_TIMEOUT_S * len(prompts)))
    wall = time.monotonic() - start
    per_replica = replica_timings(APP_NAME, REPLICAS)
    serve.delete(APP_NAME)
    timings = [t for ts in per_replica.values() for t in ts]
    busy = [max(t["last_token_s"] for t in ts) - min(t["first_scheduled_s"] for t in ts)
            for ts in per_replica.values() if ts]
    ttfts = sorted(t["ttft_s"] for t in timings)
    return {
        "router": router, "requests": len(usage), "replicas_seen": len(per_replica),
        "per_replica": [len(ts) for ts in per_replica.values()],
        "hit_rate": sum(u[1] for u in usage) / sum(u[0] for u in usage),
        "ttft_ms": statistics.median(ttfts) * 1e3, "ttft_mean_ms": statistics.fmean(ttfts) * 1e3,
        "ttft_p90_ms": ttfts[int(0.9 * (len(ttfts) - 1))] * 1e3,
        "throughput": sum(u[2] for u in usage) / max(busy), "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=12)
    parser.add_argument("--per-group", type=int, default=6)
    parser.add_argument("--suffix-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray
    from ray import serve

    from optimum_npu.sim_device.memory import devices

    with tempfile.TemporaryDirectory() as tmp:
        folder = compile_folder(Path(tmp))
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(folder).vocab_size
        prompts = workload(args.groups, args.per_group, args.suffix_len, vocab, args.seed)
        ray.init(address="local", num_cpus=4, include_dashboard=False, resources={"RBLN": len(devices())},
                 _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            results = [run(folder, r, prompts, args.output_len, args.clients, port) for r in args.routers.split(",")]
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\n{len(prompts)} requests: {args.groups} groups x {args.per_group}, prompt {PREFIX_LEN} shared + "
          f"{args.suffix_len} own tokens, {args.output_len} output tokens, {args.clients} clients, {REPLICAS} replicas")
    print(f"{'router':<14}{'hit rate':>10}{'TTFT med ms':>13}{'mean ms':>9}{'p90 ms':>9}{'tok/s (sim)':>13}"
          f"{'wall s':>9}  requests per replica")
    for r in results:
        print(f"{r['router']:<14}{r['hit_rate']:>10.1%}{r['ttft_ms']:>13.3f}{r['ttft_mean_ms']:>9.3f}"
              f"{r['ttft_p90_ms']:>9.3f}"
              f"{r['throughput']:>13.1f}{r['wall_s']:>9.1f}  {r['per_replica']}")


if __name__ == "__main__":
    main()
