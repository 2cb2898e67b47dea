"""The serving planner against vLLM on the simulated device, on the same workload.

    python benchmarks/serving.py [--requests 16] [--input-len 200] [--output-len 32] [--tp 1]

A small random Llama (4 layers, hidden 256, vocab 2048) is compiled with batch 4, decode
buckets 1, 2 and 4, max_seq_len 512 and 64-token prefill chunks. The workload is a closed loop
of 4 users, each sending its next request (random prompt tokens, greedy, a fixed number of
output tokens) when its previous one completes.

- planner: `optimum_npu/planning/serving.py`'s discrete-event simulation priced by the
  compiled graphs' own estimates (`StepTimes.from_graphs`), no host overhead, in both of its
  scheduling modes: a prompt chunk alone in its step (the RBLN stack's scheduler, what
  `optimum-npu plan` assumes) and vLLM's own scheduler, which the NPU plugin keeps (a token
  budget per step: the running requests' decode tokens and prompt pieces first, then waiting
  requests admitted with the tokens left; the ratio column compares this one);
- engine: vLLM (in this process) serving the compiled folder through the NPU plugin, with
  max_num_batched_tokens 68 (a chunk and one decode token per slot) and
  long_prefill_token_threshold 64. TTFT and TPOT are the model runner's, on its simulated
  serving clock (optimum_npu/vllm/serving_clock.py: device time while steps run, wall time
  while the engine has nothing to run; a request sent between two steps of a busy engine
  arrives at the end of the first); throughput is output tokens over
  the devices' clock from the first request to the last token.

Both count device time only (the engine's host time is not on the device clock). Printed side
by side: output tokens per simulated second, median TTFT and TPOT, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

BATCH, BUCKETS, MAX_SEQ_LEN, CHUNK = 4, (1, 2, 4), 512, 64


def compile_model(folder: Path, tp: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_npu import RBLNAutoModelForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=2048, max_position_embeddings=MAX_SEQ_LEN,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder / "source")
    model = RBLNAutoModelForCausalLM.from_pretrained(
        str(folder / "source"), export=True, rbln_batch_size=BATCH, rbln_decoder_batch_sizes=list(BUCKETS),
        rbln_max_seq_len=MAX_SEQ_LEN, rbln_prefill_chunk_size=CHUNK, rbln_tensor_parallel_size=tp)
    model.save_pretrained(folder / "compiled")
    return model


def planner(model, requests: int, input_len: int, output_len: int, prefill_with_decode: bool) -> dict:
    from optimum_npu.planning.serving import StepTimes, closed_loop, simulate

    times = StepTimes.from_graphs(model.graphs, CHUNK, MAX_SEQ_LEN, grid=64)
    vllm = dict(token_budget=CHUNK + BATCH, long_prefill_threshold=CHUNK) if prefill_with_decode else {}
    result = simulate(times, closed_loop(BATCH, requests, input_len, output_len), buckets=list(BUCKETS),
                      prefill_with_decode=prefill_with_decode, **vllm)
    return {"tokens_per_s": result.output_tokens_per_s, "ttft_s": statistics.median(r.ttft_s for r in result.requests),
            "tpot_s": statistics.median(r.tpot_s for r in result.requests), "prefill_runs": result.prefill_chunks}


def engine(folder: Path, requests: int, input_len: int, output_len: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: its runner's clock is readable
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder / "compiled"), max_num_seqs=BATCH, max_num_batched_tokens=CHUNK + BATCH,
              long_prefill_token_threshold=CHUNK, enable_prefix_caching=False, seed=0,
              skip_tokenizer_init=True)  # token ids in and out: the random model has no tokenizer
    engine = llm.llm_engine
    runner = engine.model_executor.driver_worker.worker.model_runner
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, detokenize=False)
    generator = torch.Generator().manual_seed(1)
    arrivals: list[str] = []   # request ids, in the order sent

    def send():
        request_id = f"r{len(arrivals)}"
        arrivals.append(request_id)
        prompt = torch.randint(3, 2048, (input_len,), generator=generator).tolist()
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)

    prefill = runner.steps.model.runtimes["prefill"].stats
    for _ in range(BATCH):
        send()
    start, finished, runs = runner.steps.clock_s(), 0, prefill.runs
    for _ in range(100 * requests * (input_len + output_len)):  # bounded; ends when all are done
        for output in engine.step():
            if output.finished:
                finished += 1
                if len(arrivals) < requests:
                    send()
        if finished == requests:
            break
    end, runs = runner.steps.clock_s(), prefill.runs - runs
    engine.add_request("last", {"prompt_token_ids": [5]}, SamplingParams(max_tokens=1, detokenize=False))  # a step that retires them
    while engine.has_unfinished_requests():
        engine.step()
    timings = {rid.rsplit("-", 1)[0]: t for rid, t in runner.finished_timings.items()}
    ttft = [timings[r].ttft_s for r in arrivals]  # from arrival, on the runner's simulated serving clock
    tpot = [timings[r].tpot_s for r in arrivals]
    return {"tokens_per_s": requests * output_len / (end - start), "ttft_s": statistics.median(ttft),
            "tpot_s": statistics.median(tpot), "prefill_runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    if args.input_len + args.output_len > MAX_SEQ_LEN:
        parser.error(f"--input-len + --output-len must be at most {MAX_SEQ_LEN}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = compile_model(folder, args.tp)
        alone = planner(model, args.requests, args.input_len, args.output_len, prefill_with_decode=False)
        plan = planner(model, args.requests, args.input_len, args.output_len, prefill_with_decode=True)
        del model
        served = engine(folder, args.requests, args.input_len, args.output_len)
    print(f"{args.requests} requests, {args.input_len} in / {args.output_len} out, closed loop of {BATCH}, "
          f"TP {args.tp}, chunk {CHUNK}, buckets {list(BUCKETS)} (simulated device time)")
    print(f"{'':20}{'planner, prefill alone':>24}{'planner, with decode':>22}{'vLLM engine':>13}{'engine/planner':>16}")
    for key, label, scale in (("tokens_per_s", "output tokens/s", 1), ("ttft_s", "median TTFT (ms)", 1e3),
                              ("tpot_s", "median TPOT (ms)", 1e3), ("prefill_runs", "prefill chunk runs", 1)):
        print(f"{label:20}{alone[key] * scale:24.2f}{plan[key] * scale:22.2f}{served[key] * scale:13.2f}"
              f"{served[key] / plan[key]:16.3f}")
    chunks = -(-args.input_len // CHUNK)
    print(f"vLLM's scheduler admits a waiting request with the tokens its step has left (here up to {BATCH}, the\n"
          f"budget of {CHUNK + BATCH} less a {CHUNK}-token chunk and the decodes), so a prompt starts with a small piece; "
          f"each piece costs a\nwhole compiled chunk run on the NPU: more runs than the {chunks} per prompt of the "
          "prefill-alone schedule. The\n'with decode' planner schedules as vLLM does (docs/performance-model.md, "
          "\"The planner against vLLM\").")


if __name__ == "__main__":
    main()
