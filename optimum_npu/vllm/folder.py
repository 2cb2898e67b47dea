"""What a compiled decoder folder lets vLLM do, and vLLM's config fitted to it.

A compiled folder fixes the batch (decode buckets), the context length, the KV block size and
the number of KV blocks: vLLM's scheduler must not ask for more. `fit_vllm_config` sets what
the user left to vLLM's defaults from the folder and refuses, naming both values, what the
user asked for beyond it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from ..configuration import CONFIG_NAME

logger = logging.getLogger("vllm.optimum_npu")  # under "vllm": vLLM's log handler and level apply

# vLLM's own defaults of max_num_seqs (engine/arg_utils.py: per usage context and device size,
# doubled in throughput mode). A value among these was not chosen by the user, so it is lowered
# to what the folder holds instead of refused.
VLLM_DEFAULT_MAX_NUM_SEQS = (128, 256, 512, 1024, 2048)


class NotCompiledError(ValueError):
    """The model folder holds no compiled model."""


def export_command(folder: str) -> str:
    """The command that compiles `folder` (a Hugging Face checkpoint) into a servable folder."""
    target = f"{str(folder).rstrip('/')}-npu"
    return (
        "python -c \"from optimum_npu import RBLNAutoModelForCausalLM; "
        f"RBLNAutoModelForCausalLM.from_pretrained('{folder}', export=True, rbln_batch_size=4, "
        f"rbln_max_seq_len=4096, rbln_tensor_parallel_size=1).save_pretrained('{target}')\""
        f"  and serve {target}"
    )


@dataclass(frozen=True)
class CompiledDecoder:
    """The facts of a compiled decoder folder that vLLM's config must respect."""

    folder: str
    cls_name: str
    batch_size: int
    max_seq_len: int
    block_size: int
    num_blocks: int
    prefill_chunk_size: int
    decoder_batch_sizes: tuple[int, ...]
    tensor_parallel_size: int
    dtype: str
    npu: str
    ring_cache: bool = False  # cache_impl sliding_window / hybrid: a sequence's ring is the row of its first block
    lora_adapters: tuple[tuple[int, str], ...] = ()   # (lora_int_id, lora_name) of each compiled LoRA adapter

    @classmethod
    def read(cls, folder: str) -> CompiledDecoder:
        """The folder's compiled options; NotCompiledError (with the command that compiles it) if
        it has none, ValueError if it holds something other than a decoder-only LM."""
        from ..modeling.decoderonly.configuration_decoderonly import RBLNDecoderOnlyModelForCausalLMConfig

        path = Path(folder)
        if not (path / CONFIG_NAME).is_file():
            what = "a Hugging Face checkpoint" if (path / "config.json").is_file() else "not a model folder"
            raise NotCompiledError(
                f"{folder} is {what}, not a model compiled for the NPU (no {CONFIG_NAME}); the NPU platform "
                f"serves compiled folders only. Compile it first: {export_command(folder)}"
            )
        try:
            config = RBLNDecoderOnlyModelForCausalLMConfig.load(folder)
        except ValueError as err:
            raise ValueError(f"{folder} cannot be served by vLLM on the NPU: {err}") from None
        if not config.is_resolved:
            raise ValueError(f"{path / CONFIG_NAME} does not give every decoder option; recompile the folder")
        if not config.decoder_batch_sizes:
            raise ValueError(f"{folder} holds a headless decoder ({config.cls_name}: no decode graph); vLLM on the NPU "
                             "serves causal LMs only")
        return cls(
            folder=str(folder), cls_name=str(config.cls_name), batch_size=config.batch_size,
            max_seq_len=config.max_seq_len, block_size=config.kvcache_block_size,
            num_blocks=config.kvcache_num_blocks, prefill_chunk_size=config.prefill_chunk_size,
            decoder_batch_sizes=tuple(config.decoder_batch_sizes),
            tensor_parallel_size=config.tensor_parallel_size, dtype=config.dtype, npu=config.npu,
            ring_cache=bool(config.ring_layers),
            lora_adapters=() if config.lora_config is None else tuple(
                (a.lora_int_id, a.lora_name) for a in config.lora_config.adapters),
        )

    def describe_adapters(self) -> str:
        return ", ".join(f"{i} ({name})" for i, name in self.lora_adapters) or "none"

    @property
    def max_blocks_per_seq(self) -> int:
        return math.ceil(self.max_seq_len / self.block_size)


def fit_vllm_config(vllm_config, compiled: CompiledDecoder) -> None:
    """Make vLLM's config what the folder can run, in place; ValueError naming both values for
    what the user asked beyond it."""
    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    scheduler_config = vllm_config.scheduler_config
    parallel_config = vllm_config.parallel_config
    where = f"the folder {compiled.folder} was compiled with"

    _fit_lora(vllm_config.lora_config, compiled)
    if parallel_config.tensor_parallel_size != 1 or parallel_config.pipeline_parallel_size != 1:
        raise ValueError(
            f"tensor_parallel_size={parallel_config.tensor_parallel_size} / pipeline_parallel_size="
            f"{parallel_config.pipeline_parallel_size} given to vLLM, but the model's parallelism is fixed at "
            f"compile time ({where} tensor_parallel_size={compiled.tensor_parallel_size}, run by one vLLM "
            "worker): leave vLLM's tensor_parallel_size and pipeline_parallel_size at 1"
        )
    if compiled.prefill_chunk_size > compiled.block_size:
        # A prefill chunk must fit the blocks a sequence owns (see model_runner.prefill_windows).
        raise ValueError(
            f"{where} prefill_chunk_size={compiled.prefill_chunk_size} above kvcache_block_size="
            f"{compiled.block_size}; vLLM needs a chunk within one block: recompile with a smaller chunk"
        )

    # max_model_len: vLLM's default is the HF config's context; a value the user gave must fit.
    asked = model_config.original_max_model_len
    if asked is not None and model_config.max_model_len > compiled.max_seq_len:
        raise ValueError(
            f"max_model_len={model_config.max_model_len} is above what {where}: max_seq_len="
            f"{compiled.max_seq_len}; lower max_model_len or recompile with a larger rbln_max_seq_len"
        )
    if model_config.max_model_len > compiled.max_seq_len:
        logger.info("max_model_len %d -> %d (the compiled max_seq_len)", model_config.max_model_len,
                    compiled.max_seq_len)
        model_config.max_model_len = compiled.max_seq_len
    scheduler_config.max_model_len = model_config.max_model_len

    # block_size: the compiled KV block (a vLLM block is one compiled block, ids shifted by one).
    if cache_config.user_specified_block_size and cache_config.block_size != compiled.block_size:
        raise ValueError(
            f"block_size={cache_config.block_size} differs from what {where}: kvcache_block_size="
            f"{compiled.block_size}; leave block_size unset or set it to {compiled.block_size}"
        )
    cache_config.block_size = compiled.block_size
    if cache_config.enable_prefix_caching and compiled.ring_cache:
        # Two requests sharing a cached first block would share one sliding-window ring.
        logger.warning("prefix caching is turned off: %s keeps its sliding-window layers in a ring per sequence "
                       "(rbln_cache_impl=sliding_window / hybrid), the ring of a sequence's first block, which "
                       "requests sharing a prefix would share; compile with rbln_cache_impl='static' to share "
                       "prefixes", compiled.folder)
        cache_config.enable_prefix_caching = False
    if cache_config.enable_prefix_caching and compiled.block_size >= compiled.max_seq_len:
        # vLLM's prefix cache shares whole blocks, and a request computes at least its last token.
        logger.info("prefix caching cannot reuse any block: a KV block of %d tokens holds a whole sequence (eager "
                    "attention); compile with flash attention (rbln_kvcache_partition_len) to share prefixes in "
                    "blocks of the partition", compiled.block_size)

    # max_num_seqs: at most the largest compiled decode bucket.
    largest = max(compiled.decoder_batch_sizes)
    if scheduler_config.max_num_seqs > largest:
        if scheduler_config.max_num_seqs not in VLLM_DEFAULT_MAX_NUM_SEQS:
            raise ValueError(
                f"max_num_seqs={scheduler_config.max_num_seqs} is above what {where}: batch_size="
                f"{compiled.batch_size} (decode batch sizes {sorted(compiled.decoder_batch_sizes)}); lower "
                "max_num_seqs or recompile with a larger rbln_batch_size"
            )
        logger.info("max_num_seqs %d -> %d (the compiled batch)", scheduler_config.max_num_seqs, largest)
        scheduler_config.max_num_seqs = largest

    # The KV pool: vLLM keeps block 0 as its null block, so it gets one block more than compiled
    # and the model runner maps vLLM's block b to compiled block b - 1.
    blocks = compiled.num_blocks + 1
    if cache_config.num_gpu_blocks_override not in (None, blocks):
        raise ValueError(
            f"num_gpu_blocks_override={cache_config.num_gpu_blocks_override} differs from what {where}: "
            f"kvcache_num_blocks={compiled.num_blocks} (vLLM's count is one more, {blocks}: its null block)"
        )
    cache_config.num_gpu_blocks_override = blocks
    if compiled.num_blocks < math.ceil(model_config.max_model_len / compiled.block_size):
        raise ValueError(
            f"{where} kvcache_num_blocks={compiled.num_blocks} blocks of {compiled.block_size} tokens, fewer than "
            f"one sequence of max_model_len={model_config.max_model_len} needs; lower max_model_len"
        )


def _fit_lora(lora_config, compiled: CompiledDecoder) -> None:
    """LoRA adapters are compiled in (rbln_lora_config): vLLM's enable_lora selects among them by
    LoRARequest.lora_int_id and loads none of its own."""
    if lora_config is None:
        if compiled.lora_adapters:
            logger.info("the folder has LoRA adapters %s compiled in: serve with enable_lora=True (--enable-lora) "
                        "to select them by lora_int_id", compiled.describe_adapters())
        return
    if not compiled.lora_adapters:
        raise ValueError(f"enable_lora=True, but the folder {compiled.folder} has no LoRA adapters compiled in: "
                         "adapters are fixed at compile time on the NPU; compile the folder with "
                         "rbln_lora_config=RBLNLoRAConfig(adapters=[...]), or serve it without enable_lora")
    if lora_config.max_loras < len(compiled.lora_adapters):
        logger.info("max_loras=%d: vLLM runs at most that many of the %d compiled adapters in one step (every "
                    "compiled adapter can share a step: set max_loras=%d)", lora_config.max_loras,
                    len(compiled.lora_adapters), len(compiled.lora_adapters))


def check_adapter(compiled, lora_request) -> None:
    """ValueError unless the folder was compiled with the LoRARequest's adapter: its lora_int_id
    selects it, and a name given with it must be the compiled adapter's (vLLM's OpenAI server
    numbers --lora-modules 1, 2, ... in the order given: listed in another order, a name would
    select another adapter)."""
    compiled_ids = dict(compiled.lora_adapters)
    lora_id, name = lora_request.lora_int_id, lora_request.lora_name
    if lora_id not in compiled_ids:
        raise ValueError(f"LoRARequest {name!r} has lora_int_id {lora_id}, but the folder {compiled.folder} was "
                         f"compiled with the LoRA adapters {compiled.describe_adapters()} (rbln_lora_config): "
                         "adapters are fixed at compile time; use one of those ids or recompile with the adapter")
    if name != compiled_ids[lora_id] and name in compiled_ids.values():
        raise ValueError(f"LoRARequest {name!r} has lora_int_id {lora_id}, but the compiled adapter {lora_id} is "
                         f"{compiled_ids[lora_id]!r} and {name!r} is another ({compiled.describe_adapters()}); "
                         "give --lora-modules in the order of their compiled ids")
