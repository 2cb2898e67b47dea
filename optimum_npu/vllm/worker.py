"""vLLM's worker for the simulated NPU: one process runs the compiled model on all its devices.

vLLM sizes its KV pool from `determine_available_memory` / `get_kv_cache_spec`: here the pool
is the compiled one (kvcache_num_blocks blocks of kvcache_block_size tokens, already resident
on the simulated devices), so the worker reports exactly that much memory and vLLM allocates no
KV tensor of its own. The model's tensor parallelism is inside the compiled folder, so vLLM
runs one worker (its tensor_parallel_size stays 1).
"""

from __future__ import annotations

import torch
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from .model_runner import NPUModelRunner


class NPUWorker(WorkerBase):
    def init_device(self) -> None:
        # No torch.distributed process group: the simulated runtime reads one as "torchrun, one
        # process per device", while here one process drives every device of the model.
        torch.manual_seed(self.model_config.seed or 0)
        self.device = torch.device("cpu")
        self.model_runner = NPUModelRunner(self.vllm_config, self.device)

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        self.model_runner.load_model()

    def get_model(self):
        return self.model_runner.get_model()

    def get_kv_cache_spec(self):
        return self.model_runner.get_kv_cache_spec()

    def get_supported_kv_cache_layouts(self) -> list[str]:
        # The compiled caches are [blocks, kv heads, block positions, head dim] per layer and K / V.
        return ["LBHNC"]

    def set_kv_cache_layout(self, kv_cache_layout: str) -> None:
        """The layout was fixed at compile time (see get_supported_kv_cache_layouts)."""

    def determine_available_memory(self) -> int:
        """The bytes of the compiled KV pool, as vLLM's page sizes count them (plus vLLM's null
        block), so that vLLM's division gives back the compiled block count."""
        specs = self.model_runner.get_kv_cache_spec()
        blocks = self.cache_config.num_gpu_blocks_override
        return blocks * sum(spec.page_size_bytes for spec in specs.values())

    def initialize_from_config(self, kv_cache_configs) -> None:
        """Nothing to allocate: the KV blocks are the compiled graphs' device buffers."""

    def compile_or_warm_up_model(self) -> CompilationTimes:
        return CompilationTimes(language_model=0.0, encoder=0.0)  # compiled ahead of time

    def get_supported_tasks(self):
        return ("generate",)

    def execute_model(self, scheduler_output):
        return self.model_runner.execute_model(scheduler_output)

    def sample_tokens(self, grammar_output):
        return self.model_runner.sample_tokens(grammar_output)

    def take_draft_token_ids(self):
        return None

    def get_cache_block_size_bytes(self) -> int:
        specs = self.model_runner.get_kv_cache_spec()
        return sum(spec.page_size_bytes for spec in specs.values())

    def simulated_timings(self) -> list[dict]:
        """The simulated device timing of the last finished requests, oldest first (vLLM's
        collective_rpc reaches it: the Ray Serve replicas and benchmarks read it)."""
        return [{"request_id": req_id, "ttft_s": t.ttft_s, "tpot_s": t.tpot_s, "output_tokens": t.output_tokens,
                 "first_scheduled_s": t.first_scheduled_s, "last_token_s": t.last_token_s}
                for req_id, t in self.model_runner.finished_timings.items()]

    # LoRA adapters are compiled into the folder (rbln_lora_config): "loading" one checks that it
    # is there; they stay resident on the devices.
    def add_lora(self, lora_request) -> bool:
        from .folder import CompiledDecoder, check_adapter

        check_adapter(CompiledDecoder.read(self.model_config.model), lora_request)
        return True

    def remove_lora(self, lora_id: int) -> bool:
        return lora_id in self.list_loras()   # compiled in: nothing to free

    def pin_lora(self, lora_id: int) -> bool:
        return lora_id in self.list_loras()   # always resident

    def list_loras(self) -> set[int]:
        lora = self.model_runner.get_model().rbln_config.lora_config
        return set() if lora is None else {a.lora_int_id for a in lora.adapters}

    def check_health(self) -> None:
        """The simulated devices cannot fail."""

    def shutdown(self) -> None:
        self.model_runner = None
