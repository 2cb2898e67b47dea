"""The continuous-batching simulation against schedules worked out by hand, and its step times
against the compiled programs' own estimates."""

from __future__ import annotations

import pytest

from optimum_npu.planning.serving import HostOverhead, StepTimes, closed_loop, open_loop, simulate

PREFILL_S, DECODE_S = 0.010, 0.001


def fixed_times(chunk: int = 128, calls: list | None = None) -> StepTimes:
    def decode(bucket, context):
        if calls is not None:
            calls.append((bucket, context))
        return DECODE_S

    return StepTimes(chunk, lambda context: PREFILL_S, decode)


def test_one_request_prefills_chunk_by_chunk_then_decodes():
    result = simulate(fixed_times(), open_loop([0.0], input_len=300, output_len=5), buckets=[1])
    (request,) = result.requests
    assert result.prefill_chunks == 3 and result.decode_steps == 4  # the prefill yields the first token
    assert request.ttft_s == pytest.approx(3 * PREFILL_S)
    assert request.finished_s == pytest.approx(3 * PREFILL_S + 4 * DECODE_S)
    assert request.tpot_s == pytest.approx(DECODE_S)
    assert result.output_tokens_per_s == pytest.approx(5 / (3 * PREFILL_S + 4 * DECODE_S))


def test_a_prefill_stalls_the_running_decodes():
    """A runs alone; B arrives during A's 5th decode step and is prefilled before A continues."""
    result = simulate(fixed_times(), open_loop([0.0, 0.0145], input_len=128, output_len=10), buckets=[1, 2])
    a, b = sorted(result.requests, key=lambda r: r.arrival_s)
    # A: prefill 0 -> 0.010, decodes end at .011 .. .015, B's prefill .015 -> .025, then 4 more.
    assert a.first_token_s == pytest.approx(0.010)
    assert b.first_token_s == pytest.approx(0.025)
    assert a.finished_s == pytest.approx(0.025 + 4 * DECODE_S)
    assert b.finished_s == pytest.approx(0.025 + 9 * DECODE_S)
    assert a.tpot_s == pytest.approx((9 * DECODE_S + PREFILL_S) / 9)  # the stall shows in A's TPOT


def test_with_prefill_with_decode_a_chunk_and_the_running_decode_share_a_step():
    """vLLM's scheduler (the NPU vLLM plugin): the same case as above, B's prefill chunk and A's
    decode in one step. Worked by hand: A prefill 0 -> .010, decodes to .015; B's chunk .015 ->
    .025 then A's decode -> .026 (B's first token); then both decode together."""
    result = simulate(fixed_times(), open_loop([0.0, 0.0145], input_len=128, output_len=10), buckets=[1, 2],
                      prefill_with_decode=True)
    a, b = sorted(result.requests, key=lambda r: r.arrival_s)
    assert a.first_token_s == pytest.approx(0.010)
    assert b.first_token_s == pytest.approx(0.026)
    # At .026 A has 7 tokens (prefill + 5 decodes + the one beside B's chunk) and needs 3 more; B needs 9.
    assert a.finished_s == pytest.approx(0.026 + 3 * DECODE_S)
    assert b.finished_s == pytest.approx(0.026 + 9 * DECODE_S)
    assert result.decode_steps == 5 + 1 + 9


def test_vllm_scheduler_admits_a_waiting_prompt_with_the_tokens_left():
    """vLLM's scheduler with a budget of 66 tokens per step, 64-token chunks, pieces capped at 64
    while two requests are eligible; A and B (100 prompt tokens, 3 output tokens) arrive at 0.
    Worked by hand (prefill run 10 ms whatever its tokens, decode step 1 ms):
    step 1: A 0..63 (64 tokens), B admitted with the 2 left: 0..1; two runs -> .020
    step 2: A 64..99 (36), B 2..31 (30 left); two runs -> .040, A's first token
    step 3: A decodes, B 32..95 (64); one run + decode -> .051
    step 4: A decodes (its 3rd token: done), B 96..99; one run + decode -> .062, B's first token
    steps 5, 6: B alone decodes -> .063, .064."""
    result = simulate(fixed_times(chunk=64), open_loop([0.0, 0.0], input_len=100, output_len=3), buckets=[2],
                      prefill_with_decode=True, token_budget=66, long_prefill_threshold=64)
    a, b = result.requests if result.requests[0].first_token_s < result.requests[1].first_token_s else result.requests[::-1]
    assert (a.first_token_s, a.finished_s) == (pytest.approx(0.040), pytest.approx(0.062))
    assert (b.first_token_s, b.finished_s) == (pytest.approx(0.062), pytest.approx(0.064))
    assert (result.prefill_chunks, result.decode_steps) == (6, 4)


def test_vllm_scheduler_options_need_its_mode():
    with pytest.raises(ValueError, match="prefill_with_decode=True"):
        simulate(fixed_times(), open_loop([0.0], 64, 2), buckets=[1], token_budget=100)
    with pytest.raises(ValueError, match="token_budget must be a positive int"):
        simulate(fixed_times(), open_loop([0.0], 64, 2), buckets=[1], prefill_with_decode=True, token_budget=0)


def test_host_work_runs_before_every_device_step():
    """Worked by hand: 1 ms per step, 0.1 ms per sampled sequence. A alone: prefill (3 chunks, the
    last one samples), then 4 decode steps of one sequence."""
    host = HostOverhead(step_s=0.001, sequence_s=0.0001)
    result = simulate(fixed_times(), open_loop([0.0], input_len=300, output_len=5), buckets=[1], host=host)
    (request,) = result.requests
    assert request.ttft_s == pytest.approx(3 * (PREFILL_S + 0.001) + 0.0001)
    assert request.tpot_s == pytest.approx(DECODE_S + 0.001 + 0.0001)
    # Two sequences decoding together: each step samples both.
    two = simulate(fixed_times(), open_loop([0.0, 0.0], input_len=128, output_len=3), buckets=[2], host=host)
    last = max(r.finished_s for r in two.requests)
    assert last == pytest.approx(2 * (PREFILL_S + 0.0011) + 2 * (DECODE_S + 0.001 + 0.0002))
    with pytest.raises(ValueError, match="step_s"):
        HostOverhead(step_s=-1.0)


def test_decode_runs_in_the_smallest_bucket_that_holds_the_batch():
    calls = []
    simulate(fixed_times(calls=calls), open_loop([0.0, 0.0, 0.0], input_len=64, output_len=3), buckets=[1, 4, 8])
    buckets = {bucket for bucket, _ in calls}
    assert buckets == {4}  # 3 sequences: the bucket of 4
    # Contexts grow one position per step from the prompt length.
    contexts = sorted({context for _, context in calls})
    assert contexts == [65, 66]


def test_closed_loop_keeps_the_concurrency_and_serves_every_request():
    one = simulate(fixed_times(), closed_loop(concurrency=1, requests=3, input_len=128, output_len=4), buckets=[1])
    single = PREFILL_S + 3 * DECODE_S
    assert len(one.requests) == 3 and one.makespan_s == pytest.approx(3 * single)
    assert one.output_tokens_per_s == pytest.approx(12 / (3 * single))
    # More users share decode steps: more throughput, and every request still completes.
    four = simulate(fixed_times(), closed_loop(concurrency=4, requests=8, input_len=128, output_len=4), buckets=[4])
    assert len(four.requests) == 8 and four.output_tokens_per_s > one.output_tokens_per_s
    assert four.percentile("ttft_s", 99) >= four.percentile("ttft_s", 50) > 0


def test_slots_bound_the_running_batch():
    calls = []
    result = simulate(fixed_times(calls=calls), open_loop([0.0] * 5, input_len=64, output_len=3), buckets=[2])
    assert max(bucket for bucket, _ in calls) == 2 and len(result.requests) == 5


def test_bad_workloads_are_refused():
    with pytest.raises(ValueError, match="concurrency"):
        closed_loop(0, 4, 128, 4)
    with pytest.raises(ValueError, match="buckets"):
        simulate(fixed_times(), open_loop([0.0], 64, 2), buckets=[])


def test_step_times_are_the_compiled_programs_estimates():
    from test_cost_consistency import compile_tiny

    model = compile_tiny("eager")
    try:
        times = StepTimes.from_graphs(model.graphs, chunk=64, max_seq_len=256, grid=64)
        decode = model.graphs["decoder_batch_2"]
        assert times.decode_step_s(2, 128) == pytest.approx(decode.estimate(kv_len=128).total_s, rel=1e-12)
        assert times.prefill_chunk_s(192) == pytest.approx(model.graphs["prefill"].estimate(kv_len=192).total_s,
                                                           rel=1e-12)
        between = times.decode_step_s(2, 100)
        assert decode.estimate(kv_len=64).total_s <= between <= decode.estimate(kv_len=128).total_s
    finally:
        model.close()
