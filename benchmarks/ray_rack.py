"""The planner's per-server and per-rack figures beside K replicas on Ray Serve running the same workload.

    python benchmarks/ray_rack.py [--replicas 2] [--requests-per-replica 8] [--input-len 200] [--output-len 32]

A tiny random Llama (`optimum_npu.testing.build_tiny_random_llama`) is compiled as
benchmarks/serving.py compiles its model (batch 4, decode buckets 1, 2 and 4, max_seq_len 512,
64-token prefill chunks), with tensor parallelism 2: one instance is 2 devices.

- planner: `planning/serving.py`'s simulation of one instance on a closed loop of 4 users
  (vLLM's scheduling: a prompt chunk and the running decodes in one step), priced by the
  compiled graphs; scaled as `optimum-npu plan` scales it: per card (devices per card / TP
  instances), per server (cards per server), per rack (as many cards as the power budget feeds).
- Ray: K replicas of the same folder behind one endpoint (least-loaded routing), a closed loop of
  4 users per replica sending random prompts through the `openai` client. Each replica's
  device clock moves only while its steps run; its rate is its output tokens over its device time
  for the run, and the replicas' rates add up (they run side by side on their own devices). The
  same scaling from K instances to a card, a server and a rack.

- one engine: benchmarks/serving.py's in-process vLLM engine on the same folder and workload,
  which separates what vLLM's own scheduling changes (serving.py explains it) from what
  routing several replicas adds.

All count device time only. TTFT: the planner and the one engine from a request's arrival, the
Ray replicas from the step that first scheduled it (a replica cannot see when the ingress got it).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ray_routing import replica_timings
from serving import BATCH, BUCKETS, CHUNK, MAX_SEQ_LEN, engine, planner

TP = 2
NAME = "tiny"
REQUEST_TIMEOUT_S = 600


def compile_folder(root: Path):
    from optimum_npu import RBLNAutoModelForCausalLM
    from optimum_npu.testing.llama import build_tiny_random_llama

    source = build_tiny_random_llama(root / "source", max_position_embeddings=MAX_SEQ_LEN)
    model = RBLNAutoModelForCausalLM.from_pretrained(
        str(source), export=True, rbln_batch_size=BATCH, rbln_decoder_batch_sizes=list(BUCKETS),
        rbln_max_seq_len=MAX_SEQ_LEN, rbln_prefill_chunk_size=CHUNK, rbln_tensor_parallel_size=TP)
    model.save_pretrained(root / "compiled")
    return model, root / "compiled"


def ray_run(folder: Path, replicas: int, requests: int, input_len: int, output_len: int, vocab: int) -> dict:
    import openai
    import ray
    from ray import serve

    from optimum_npu.ray_serve.app import build_app
    from optimum_npu.ray_serve.launch import APP_NAME, check_devices, deploy, start_ray

    start_ray(num_cpus=4)
    try:
        check_devices(replicas, TP)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(build_app(str(folder), replicas=replicas, router="least-loaded",
                         vllm_args=["--served-model-name", NAME, "--max-num-seqs", str(BATCH),
                                    "--max-num-batched-tokens", str(CHUNK + BATCH),
                                    "--long-prefill-token-threshold", str(CHUNK), "--no-enable-prefix-caching"]))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S,
                               max_retries=0)
        rng = random.Random(1)
        prompts = [[rng.randrange(3, vocab) for _ in range(input_len)] for _ in range(requests)]

        def one(prompt):
            done = client.completions.create(model=NAME, prompt=prompt, max_tokens=output_len, temperature=0.0,
                                             extra_body={"ignore_eos": True})
            return done.usage.completion_tokens

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=BATCH * replicas) as pool:  # a closed loop of 4 users per replica
            tokens = sum(pool.map(one, prompts, timeout=REQUEST_TIMEOUT_S * requests))
        wall = time.monotonic() - start
        per_replica = replica_timings(APP_NAME, replicas)
    finally:
        serve.shutdown()
        ray.shutdown()
    rates, ttfts, in_flight = [], [], []
    for timings in per_replica.values():
        busy = max(t["last_token_s"] for t in timings) - min(t["first_scheduled_s"] for t in timings)
        rates.append(sum(t["output_tokens"] for t in timings) / busy)
        ttfts += [t["ttft_s"] for t in timings]
        # Requests in flight on the replica, averaged over its device time (the batch it ran).
        in_flight.append(sum(t["last_token_s"] - t["first_scheduled_s"] for t in timings) / busy)
    return {"tokens_per_s": sum(rates), "per_replica": rates, "in_flight": in_flight,
            "ttft_s": statistics.median(ttfts),
            "tokens": tokens, "replicas_seen": len(per_replica), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests-per-replica", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rack-power-kw", type=float, default=35.0)
    args = parser.parse_args()
    if args.input_len + args.output_len > MAX_SEQ_LEN:
        parser.error(f"--input-len + --output-len must be at most {MAX_SEQ_LEN}")

    from transformers import AutoConfig

    from optimum_npu.sim_device.specs import get_npu_spec

    requests = args.replicas * args.requests_per_replica
    with tempfile.TemporaryDirectory() as tmp:
        model, folder = compile_folder(Path(tmp))
        spec = get_npu_spec(model.rbln_config.npu)
        planned = planner(model, args.requests_per_replica, args.input_len, args.output_len, prefill_with_decode=True)
        model.close()
        del model
        vocab = AutoConfig.from_pretrained(folder).vocab_size
        served = ray_run(folder, args.replicas, requests, args.input_len, args.output_len, vocab)
        # One engine in this process on the same workload (benchmarks/serving.py's): what separates
        # the planner from vLLM itself, before any routing. After Ray: it turns vLLM's engine
        # process off in this process's environment, which Ray's workers would inherit.
        alone = engine(folder.parent, args.requests_per_replica, args.input_len, args.output_len)

    per_card = spec.devices_per_card / TP          # instances per card
    cards_in_rack = int(args.rack_power_kw * 1000 // spec.card_tdp_watts)
    planner_instance = planned["tokens_per_s"]
    ray_instance = served["tokens_per_s"] / args.replicas
    engine_instance = alone["tokens_per_s"]
    scales = [("one instance (TP 2)", 1), (f"{args.replicas} instances", args.replicas),
              (f"card ({spec.devices_per_card} devices)", per_card),
              (f"server ({spec.cards_per_server} cards)", per_card * spec.cards_per_server),
              (f"rack ({args.rack_power_kw:g} kW, {cards_in_rack} cards)", per_card * cards_in_rack)]
    print(f"\n{spec.name}: {args.input_len} in / {args.output_len} out, closed loop of {BATCH} users per instance; "
          f"planner and one engine: {args.requests_per_replica} requests; Ray: {requests} requests on "
          f"{args.replicas} replicas ({served['replicas_seen']} reported), wall {served['wall_s']:.1f} s")
    print(f"{'output tokens/s (simulated)':<32}{'planner':>12}{'one engine':>12}{'Ray':>12}{'Ray/planner':>13}"
          f"{'Ray/engine':>12}")
    for label, scale in scales:
        p, e, r = planner_instance * scale, engine_instance * scale, ray_instance * scale
        print(f"{label:<32}{p:>12.1f}{e:>12.1f}{r:>12.1f}{r / p:>13.3f}{r / e:>12.3f}")
    print(f"{'median TTFT ms':<32}{planned['ttft_s'] * 1e3:>12.3f}{alone['ttft_s'] * 1e3:>12.3f}"
          f"{served['ttft_s'] * 1e3:>12.3f}{served['ttft_s'] / planned['ttft_s']:>13.3f}"
          f"{served['ttft_s'] / alone['ttft_s']:>12.3f}")
    print(f"per replica tokens/s: {', '.join(f'{r:.1f}' for r in served['per_replica'])}; requests in flight "
          f"(mean over device time, of {BATCH}): {', '.join(f'{n:.2f}' for n in served['in_flight'])}")


if __name__ == "__main__":
    main()
