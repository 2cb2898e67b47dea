"""vLLM's model runner for a compiled decoder: each scheduler step on the compiled graphs.

vLLM's scheduler says, per step, which requests run how many tokens, with which KV blocks. A
request still inside its prompt (or recomputing one after preemption) runs its tokens through
the prefill graph, at the compiled chunk; the requests decoding one token run together through
the smallest compiled decode bucket that holds them. The logits of every request go to vLLM's
own sampler (temperature, top-p/k, penalties, logit bias, seeds, structured-output masks); a
request whose prompt is not finished this step has its sample discarded, as vLLM's GPU runner
does.

The request bookkeeping (which requests are in the batch, their tokens and sampling state) is
vLLM's `InputBatch`; block ids are vLLM's, shifted by one (vLLM's block 0 is its null block).

Each step is also timed on the simulated serving clock (serving_clock.py): per request its
queue time, time to first token and time per output token as the NPU would take them, logged
when it finishes and observed in the Prometheus metrics of metrics.py with the devices'
memory and utilisation.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.sampling_params import SamplingType
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.sample.logits_processor import build_logitsprocs
from vllm.v1.sample.sampler import Sampler
from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

from ..modeling.decoderonly.compile_plan import kv_cache_dtype
from .decoder_steps import CompiledDecoderSteps
from .metrics import DeviceMetrics
from .scheduler import ARRIVALS
from .serving_clock import ServingClock

logger = logging.getLogger("vllm.optimum_npu")  # under "vllm": vLLM's log handler and level apply

FINISHED_TIMINGS_KEPT = 4096


@dataclass
class RequestTiming:
    """One request on the simulated serving clock (seconds since the engine started)."""

    arrival_s: float
    first_scheduled_s: float
    first_token_s: float | None = None
    last_token_s: float | None = None
    output_tokens: int = 0

    @property
    def queue_s(self) -> float:
        return self.first_scheduled_s - self.arrival_s

    @property
    def ttft_s(self) -> float | None:
        """From arrival, as vLLM's own time to first token (queue time included)."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.last_token_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass
class StepPlan:
    """What one scheduler step runs: prefills one by one, then one decode of the rest."""

    prefills: list[int] = field(default_factory=list)   # batch rows
    decodes: list[int] = field(default_factory=list)
    discard: list[int] = field(default_factory=list)    # rows whose prompt is not finished: no token


class NPUModelRunner:
    def __init__(self, vllm_config, device: torch.device):
        self.vllm_config = vllm_config
        self.model_config = vllm_config.model_config
        self.device = device
        cache = vllm_config.cache_config
        sched = vllm_config.scheduler_config
        self.block_size = cache.block_size
        self.max_model_len = self.model_config.max_model_len
        self.requests: dict[str, CachedRequestState] = {}
        self.timings: dict[str, RequestTiming] = {}
        # The last finished requests' timings, oldest first (read by benchmarks/serving.py).
        self.finished_timings: OrderedDict[str, RequestTiming] = OrderedDict()
        self.input_batch = InputBatch(
            max_num_reqs=sched.max_num_seqs,
            max_model_len=self.max_model_len,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            device=device,
            vocab_size=self.model_config.get_vocab_size(),
            block_sizes=[self.block_size],
            max_num_blocks_per_req=[math.ceil(self.max_model_len / self.block_size)],
            logitsprocs=build_logitsprocs(vllm_config, device, False, False, self.model_config.logits_processors),
        )
        self.sampler = Sampler(logprobs_mode=self.model_config.logprobs_mode)
        self.steps: CompiledDecoderSteps | None = None
        self.clock: ServingClock | None = None
        self.metrics: DeviceMetrics | None = None
        self._pending = None  # (scheduler_output, logits, plan, simulated end) between execute_model and sample_tokens

    # ---- loading -------------------------------------------------------------------------

    def load_model(self) -> None:
        from ..sim_device.memory import format_gib
        from .devices import load_on_assigned_devices

        model = load_on_assigned_devices(self.model_config.model)
        self.steps = CompiledDecoderSteps(model)
        self.clock = ServingClock(self.steps.clock_s)
        name = self.model_config.served_model_name
        memory = model.device_memory()
        self.metrics = DeviceMetrics(name if isinstance(name, str) else name[0], memory)
        for m in memory:
            logger.info("NPU device %d (%s): %s of %s in use (weights %s, KV cache and other buffers %s)",
                        m.device, m.npu, format_gib(m.total_bytes), format_gib(m.capacity_bytes),
                        format_gib(m.weights_bytes), format_gib(m.buffers_bytes))

    def get_model(self):
        return self.steps.model

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        """One full-attention spec per layer with the compiled block geometry. vLLM counts and
        hands out blocks by it; the blocks themselves live on the simulated devices (the compiled
        graphs' KV buffers), so vLLM allocates no tensor for them. Sliding-window layers are
        reported as full attention: the compiled graphs apply the window and keep every block."""
        hf = self.model_config.hf_text_config
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        dtype = kv_cache_dtype(self.steps.model.rbln_config)   # float8 e4m3 for an fp8 KV cache
        spec = FullAttentionSpec(block_size=self.block_size, num_kv_heads=hf.num_key_value_heads,
                                 head_size=head_dim, dtype=dtype)
        return {f"model.layers.{i}.self_attn.attn": spec for i in range(hf.num_hidden_layers)}

    # ---- one step ------------------------------------------------------------------------

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        if self._pending is not None:
            raise RuntimeError("sample_tokens() must follow execute_model() before the next step")
        self._update_states(scheduler_output)
        if not scheduler_output.total_num_scheduled_tokens:
            return EMPTY_MODEL_RUNNER_OUTPUT
        batch = self.input_batch
        plan = self._plan(scheduler_output)
        logits = torch.zeros((batch.num_reqs, batch.vocab_size), dtype=torch.float32)
        # A request arriving with a scheduler other than ours (a user's scheduler_cls) has no
        # arrival time: it counts as arriving when first scheduled.
        arrivals = getattr(scheduler_output, ARRIVALS, {})
        step_start = self.clock.begin_step(continuing=bool(scheduler_output.scheduled_cached_reqs.req_ids),
                                           arrivals_wall=list(arrivals.values()))
        for req_id in batch.req_ids:
            if req_id not in self.timings:
                arrival = self.clock.simulated_time_of(arrivals[req_id]) if req_id in arrivals else step_start
                self.timings[req_id] = RequestTiming(arrival_s=arrival, first_scheduled_s=step_start)
        for row in plan.prefills:
            req_id = batch.req_ids[row]
            start = int(batch.num_computed_tokens_cpu[row])
            end = start + scheduler_output.num_scheduled_tokens[req_id]
            tokens = torch.from_numpy(batch.token_ids_cpu[row, :end].astype(np.int64))
            logits[row] = self.steps.prefill(tokens, self._blocks(req_id), start, self._adapter(req_id)).float()
        for group in self._decode_groups(plan.decodes):
            tokens, positions, blocks, adapters = [], [], [], []
            for row in group:
                position = int(batch.num_computed_tokens_cpu[row])
                tokens.append(int(batch.token_ids_cpu[row, position]))
                positions.append(position)
                blocks.append(self._blocks(batch.req_ids[row]))
                adapters.append(self._adapter(batch.req_ids[row]))
            logits[group] = self.steps.decode(tokens, positions, blocks, adapters).float()
        end = self.clock.end_step()
        self.metrics.step(self.clock.busy_s(), end)
        self._pending = (scheduler_output, logits, plan, end)
        return None

    def sample_tokens(self, grammar_output) -> ModelRunnerOutput:
        if self._pending is None:
            return EMPTY_MODEL_RUNNER_OUTPUT
        scheduler_output, logits, plan, clock = self._pending
        self._pending = None
        batch = self.input_batch
        if grammar_output is not None:
            from vllm.v1.structured_output.utils import apply_grammar_bitmask

            apply_grammar_bitmask(scheduler_output, grammar_output, batch, logits)
        sampler_output = self.sampler(logits=logits, sampling_metadata=batch.sampling_metadata)
        sampled = sampler_output.sampled_token_ids.tolist()
        for row in plan.discard:
            sampled[row] = []
            generator = batch.generators.get(row)
            if generator is not None:  # the discarded sample must not move a seeded stream (as vLLM's runner)
                generator.set_offset(generator.get_offset() - 4)
        for row, token_ids in enumerate(sampled):
            if not token_ids:
                continue
            start = int(batch.num_tokens_no_spec[row])
            batch.token_ids_cpu[row, start : start + len(token_ids)] = token_ids
            batch.is_token_ids[row, start : start + len(token_ids)] = True
            batch.num_tokens_no_spec[row] = start + len(token_ids)
            req_id = batch.req_ids[row]
            self.requests[req_id].output_token_ids.extend(token_ids)
            timing = self.timings[req_id]
            if timing.first_token_s is None:
                timing.first_token_s = clock
            timing.last_token_s = clock
            timing.output_tokens += len(token_ids)
        logprobs = sampler_output.logprobs_tensors
        return ModelRunnerOutput(
            req_ids=list(batch.req_ids),
            req_id_to_index=dict(batch.req_id_to_index),
            sampled_token_ids=sampled,
            logprobs=logprobs.tolists() if logprobs is not None else None,
            prompt_logprobs_dict={},
        )

    def _plan(self, scheduler_output) -> StepPlan:
        batch = self.input_batch
        plan = StepPlan()
        for row, req_id in enumerate(batch.req_ids):
            scheduled = scheduler_output.num_scheduled_tokens[req_id]
            computed = int(batch.num_computed_tokens_cpu[row])
            known = int(batch.num_tokens_no_spec[row])  # prompt + tokens sampled so far
            if scheduled == 1 and computed == known - 1 and computed >= batch.num_prompt_tokens[row]:
                plan.decodes.append(row)
            else:
                plan.prefills.append(row)
                if computed + scheduled < known:
                    plan.discard.append(row)
        return plan

    def _decode_groups(self, rows: list[int]) -> list[list[int]]:
        largest = max(self.steps.decoder_batch_sizes)
        return [rows[i : i + largest] for i in range(0, len(rows), largest)]

    def _blocks(self, req_id: str) -> list[int]:
        """The request's blocks as compiled block ids (vLLM's ids less its null block 0)."""
        return [block - 1 for block in self.requests[req_id].block_ids[0]]

    def _adapter(self, req_id: str) -> int:
        """The compiled LoRA adapter slot of the request's LoRARequest (0: none)."""
        return self.steps.adapter_slot(self.requests[req_id].lora_request)

    # ---- vLLM's request bookkeeping ------------------------------------------------------

    def _update_states(self, scheduler_output) -> None:
        """Bring the request states and the persistent batch up to this step (the single-process,
        no-speculation, no-PP part of vLLM's GPU runner's `_update_states`)."""
        batch = self.input_batch
        for req_id in scheduler_output.finished_req_ids:
            self.requests.pop(req_id, None)
            self._log_timing(req_id)
            batch.remove_request(req_id)
        scheduled = scheduler_output.num_scheduled_tokens.keys()
        cached = scheduler_output.scheduled_cached_reqs
        for req_id in batch.req_id_to_index.keys() - (scheduled - cached.resumed_req_ids):
            batch.remove_request(req_id)  # preempted or not scheduled this step; state kept

        to_add: list[CachedRequestState] = []
        for new in scheduler_output.scheduled_new_reqs:
            params = new.sampling_params
            generator = None
            if params is not None and params.sampling_type == SamplingType.RANDOM_SEED:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed)
            state = CachedRequestState(
                req_id=new.req_id, prompt_token_ids=new.prompt_token_ids, prompt_embeds=new.prompt_embeds,
                prompt_is_token_ids=new.prompt_is_token_ids, mm_features=new.mm_features,
                sampling_params=params, pooling_params=new.pooling_params, generator=generator,
                block_ids=new.block_ids, num_computed_tokens=new.num_computed_tokens, output_token_ids=[],
                lora_request=new.lora_request,
            )
            self.requests[new.req_id] = state
            to_add.append(state)

        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            computed = cached.num_computed_tokens[i]
            new_blocks = cached.new_block_ids[i]
            state.num_computed_tokens = computed
            outputs = cached.num_output_tokens[i]
            row = batch.req_id_to_index.get(req_id)
            if outputs < len(state.output_token_ids):
                del state.output_token_ids[outputs:]
                if row is not None:
                    batch.num_tokens_no_spec[row] = batch.num_prompt_tokens[row] + outputs
            if req_id in cached.resumed_req_ids:
                state.block_ids = new_blocks
            elif new_blocks is not None:
                for ids, added in zip(state.block_ids, new_blocks):
                    ids.extend(added)
            if row is None:
                to_add.append(state)
                continue
            batch.num_computed_tokens_cpu[row] = computed
            if new_blocks is not None:
                batch.block_table.append_row(new_blocks, row)
        for state in to_add:
            batch.add_request(state)
        batch.condense()
        batch.refresh_metadata()

    def _log_timing(self, req_id: str) -> None:
        timing = self.timings.pop(req_id, None)
        if timing is None or timing.ttft_s is None:
            return
        self.finished_timings[req_id] = timing
        while len(self.finished_timings) > FINISHED_TIMINGS_KEPT:
            self.finished_timings.popitem(last=False)
        tpot = timing.tpot_s
        self.metrics.request(timing.queue_s, timing.ttft_s, tpot)
        logger.info("NPU request %s: simulated arrival at %.7f s, queue %.4f ms, TTFT %.4f ms, TPOT %s, "
                    "%d output tokens", req_id, timing.arrival_s, timing.queue_s * 1e3, timing.ttft_s * 1e3,
                    f"{tpot * 1e3:.4f} ms" if tpot is not None else "-", timing.output_tokens)
