"""The simulated NPU as a vLLM platform.

vLLM asks its platform for the worker class and lets it adjust the engine config before any
worker starts. Here the worker is `NPUWorker`, the config is fitted to the compiled folder
(folder.fit_vllm_config), and everything vLLM would do for a GPU model (torch.compile, CUDA
graphs, attention backends, its own KV tensors) is left out: the compiled graphs hold the model
and its KV cache on the simulated devices. Host tensors are CPU tensors, hence the "cpu" device.
"""

from __future__ import annotations

import logging
import os

import torch
from vllm.platforms.interface import Platform, PlatformEnum

logger = logging.getLogger("vllm.optimum_npu")  # under "vllm": vLLM's log handler and level apply

WORKER = "optimum_npu.vllm.worker.NPUWorker"
SCHEDULER = "optimum_npu.vllm.scheduler.NPUScheduler"


class NPUPlatform(Platform):
    # vLLM's code paths for a CPU host (sampling ops, memory cleanup, defaults) are the right
    # ones for everything vLLM itself runs here; the NPU part is the worker, which this class names.
    _enum = PlatformEnum.CPU
    device_name: str = "cpu"          # host tensors (inputs, logits, sampler state) live on the CPU
    device_type: str = "cpu"
    dispatch_key: str = "CPU"
    dist_backend: str = "gloo"
    ray_device_key: str = "CPU"
    device_control_env_var: str = "RBLN_DEVICES"
    simple_compile_backend: str = "eager"

    @classmethod
    def import_kernels(cls) -> None:
        # vLLM's host kernels (sampling, structured output) are its CPU build's; which library
        # loads depends on the host's instruction set, as vLLM's CPU platform decides.
        from vllm.platforms.cpu import CpuPlatform

        CpuPlatform.import_kernels()

    @classmethod
    def register_triton_kernel_overrides(cls) -> None:
        from vllm.platforms.cpu import CpuPlatform

        CpuPlatform.register_triton_kernel_overrides()

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        from ..sim_device.specs import DEFAULT_NPU

        return DEFAULT_NPU

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        from ..sim_device.specs import DEFAULT_NPU, get_npu_spec

        return get_npu_spec(DEFAULT_NPU).dram_bytes

    @classmethod
    def inference_mode(cls):
        return torch.no_grad()

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        """One process drives every simulated device of the model; nothing to select."""

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        torch.manual_seed(seed)

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        return "vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator"

    @classmethod
    def supports_structured_output(cls) -> bool:
        return True

    @classmethod
    def get_current_memory_usage(cls, device=None) -> float:
        return 0.0  # the host holds no KV cache or weights of vLLM's own

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        from .folder import CompiledDecoder, fit_vllm_config

        model_config = vllm_config.model_config
        if model_config is None:  # vLLM builds configs without a model in some of its paths
            return
        compiled = CompiledDecoder.read(model_config.model)
        fit_vllm_config(vllm_config, compiled)
        parallel_config = vllm_config.parallel_config
        if parallel_config.worker_cls == "auto":
            parallel_config.worker_cls = WORKER
        # The model runner samples each step before the next is scheduled.
        scheduler_config = vllm_config.scheduler_config
        scheduler_config.async_scheduling = False
        if scheduler_config.scheduler_cls is None:  # vLLM's scheduler, telling the runner when requests arrive
            scheduler_config.scheduler_cls = SCHEDULER
        if vllm_config.speculative_config is not None:
            raise ValueError("speculative decoding is not supported by the NPU platform; drop speculative_config")
        # No torch.compile and no CUDA graphs: the compiled NPU graphs are what runs.
        from vllm.config import CompilationMode, CUDAGraphMode

        compilation = vllm_config.compilation_config
        compilation.mode = CompilationMode.NONE
        compilation.cudagraph_mode = CUDAGraphMode.NONE
        model_config.enforce_eager = True
        # Spawn, never fork, the engine process: torch's OpenMP thread pool (GNU libgomp) does not survive
        # a fork, so an engine forked from a process that already ran torch ops on several threads (a
        # user's script, a notebook, a test session) hangs in its first parallel op. vLLM's CPU platform
        # sets the same.
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        logger.info("NPU platform: serving %s (%s, TP %d, batch %d, max_seq_len %d, %d KV blocks of %d)",
                    compiled.folder, compiled.cls_name, compiled.tensor_parallel_size, compiled.batch_size,
                    compiled.max_seq_len, compiled.num_blocks, compiled.block_size)

    @classmethod
    def validate_request(cls, processed_inputs, params) -> None:
        prompt_logprobs = getattr(params, "prompt_logprobs", None)
        if prompt_logprobs is not None:
            raise ValueError("prompt_logprobs is not supported on the NPU: the compiled prefill returns the "
                             "logits of the last prompt token only")
