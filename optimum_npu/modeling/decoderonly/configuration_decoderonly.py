"""Options of a compiled decoder-only causal LM (Llama, Qwen2, Qwen3, Mistral, ...), as on optimum-rbln.

The KV cache is paged: `kvcache_num_blocks` blocks of `kvcache_block_size` tokens, shared by
the batch slots through a block table. Two attention implementations:

- "eager": one block holds a whole sequence (block size == max_seq_len), so each batch slot
  owns exactly one block. Simple, limited to max_seq_len <= 32768.
- "flash_attn": attention runs over KV partitions of `kvcache_partition_len` tokens with an
  online softmax; a block is one partition, and a slot uses max_seq_len / partition blocks.

A user config leaves some options None ("pick for me"); `finalize(hf_config)` fills them from
the Hugging Face config and checks the rules that tie options together:

    config, hf_kwargs = RBLNLlamaForCausalLMConfig.from_kwargs(kwargs)
    config = config.finalize(hf_model_config)     # every option set, every rule checked
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from optimum_npu.configuration import OPTION_PREFIX, RBLNModelConfig, check_bool, check_choice, check_int
from optimum_npu.modeling.quantization import Quantization, check_fp8_support, normalize_option

from .lora import RBLNLoRAConfig

logger = logging.getLogger(__name__)

ATTN_IMPLS = ("eager", "flash_attn")
CACHE_IMPLS = ("static", "sliding_window", "hybrid")

# Limits of the real stack (optimum-rbln), kept so code that compiles here compiles there.
MAX_EAGER_SEQ_LEN = 32_768          # eager attention materializes the whole sequence per block
MIN_FLASH_MAX_SEQ_LEN = 8_192       # flash attention is for long contexts only
MIN_PARTITION_LEN = 4_096
MAX_PARTITION_LEN = 32_768
DEFAULT_PARTITION_LEN = 4_096       # used when attn_impl="flash_attn" and no partition is given
PREFILL_CHUNK_MULTIPLE = 64         # the prefill graph is tiled in 64-token steps

_P = OPTION_PREFIX  # error messages name options as the user types them: rbln_max_seq_len


@dataclass(frozen=True, kw_only=True)
class RBLNDecoderOnlyModelForCausalLMConfig(RBLNModelConfig):
    """Compile-time options of a decoder-only LM (plus the base npu / dtype / batch_size / ... )."""

    max_seq_len: int | None = None            # None: the HF config's max_position_embeddings
    prefill_chunk_size: int = 128             # prompt tokens processed per prefill step
    attn_impl: str | None = None              # None: "flash_attn" if kvcache_partition_len is set, else "eager"
    kvcache_partition_len: int | None = None  # flash attention only
    kvcache_block_size: int | None = None     # None: max_seq_len (eager) / kvcache_partition_len (flash)
    kvcache_num_blocks: int | None = None     # None: every slot at full length (flash: as many as memory holds)
    memory_budget: float | None = None        # fraction of a device's usable memory the model may take (None: 1.0)
    lora_config: RBLNLoRAConfig | None = None # LoRA adapters compiled in, chosen per request (lora.py)
    decoder_batch_sizes: tuple[int, ...] | None = None  # decode graphs to compile; None: (batch_size,)
    use_inputs_embeds: bool = False           # the prefill graph takes embeddings instead of token ids
    use_attention_mask: bool = False          # pass an explicit attention mask (else derived from positions)
    # Where the sliding-window layers keep K/V: "static" (None): the paged cache of max_seq_len
    # positions, keys outside the window masked; "sliding_window" (every layer windowed, Mistral) /
    # "hybrid" (some, Gemma): a ring of sliding_window + prefill_chunk_size - 1 positions per sequence.
    cache_impl: str | None = None
    sliding_window: int | None = None               # None: the model's (it must be the model's)
    sliding_window_layers: tuple[int, ...] | None = None  # None: the model's windowed layers (idem)
    # optimum-rbln's rbln_quantization: {"weights": "int4", "group_size": 128, "kv_caches": "fp8", ...}
    # (modeling/quantization.py); stored as its canonical dict. None: every weight and the KV cache in 16 bits.
    quantization: Mapping[str, Any] | None = field(default=None, hash=False)

    def _validate(self) -> None:
        super()._validate()
        self._set("quantization", normalize_option(self.quantization))
        check_fp8_support(self.quantization, self.npu)
        # Each option on its own.
        check_int("max_seq_len", self.max_seq_len, allow_none=True)
        check_int("prefill_chunk_size", self.prefill_chunk_size)
        if self.prefill_chunk_size % PREFILL_CHUNK_MULTIPLE:
            raise ValueError(
                f"{_P}prefill_chunk_size must be a multiple of {PREFILL_CHUNK_MULTIPLE}; got {self.prefill_chunk_size}"
            )
        check_choice("attn_impl", self.attn_impl, (None, *ATTN_IMPLS))
        check_int("kvcache_partition_len", self.kvcache_partition_len, allow_none=True)
        if self.kvcache_partition_len is not None and not (
            MIN_PARTITION_LEN <= self.kvcache_partition_len <= MAX_PARTITION_LEN
        ):
            raise ValueError(
                f"{_P}kvcache_partition_len must be between {MIN_PARTITION_LEN} and {MAX_PARTITION_LEN}; "
                f"got {self.kvcache_partition_len}"
            )
        check_int("kvcache_block_size", self.kvcache_block_size, allow_none=True)
        check_int("kvcache_num_blocks", self.kvcache_num_blocks, allow_none=True)
        if self.memory_budget is not None and (isinstance(self.memory_budget, bool)
                                               or not isinstance(self.memory_budget, (int, float))
                                               or not 0 < self.memory_budget <= 1):
            raise ValueError(f"{_P}memory_budget must be a fraction of the device memory in (0, 1] (or None: all of "
                             f"it); got {self.memory_budget!r}")
        check_bool("use_inputs_embeds", self.use_inputs_embeds)
        check_bool("use_attention_mask", self.use_attention_mask)
        check_choice("cache_impl", self.cache_impl, (None, *CACHE_IMPLS))
        check_int("sliding_window", self.sliding_window, allow_none=True)
        layers = self.sliding_window_layers
        if layers is not None:
            if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)):
                raise TypeError(f"{_P}sliding_window_layers must be a list of layer indices; got {layers!r}")
            for index in layers:
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise ValueError(f"{_P}sliding_window_layers must hold layer indices >= 0; got {layers!r}")
            self._set("sliding_window_layers", tuple(sorted(set(layers))))
        if self.cache_impl in (None, "static") and (self.sliding_window is not None or layers is not None):
            raise ValueError(f"{_P}sliding_window / {_P}sliding_window_layers size the ring cache of "
                             f"{_P}cache_impl='sliding_window' or 'hybrid'; with cache_impl="
                             f"{self.cache_impl or 'static'!r} they are the model's own: drop them")
        if self.cache_impl in ("sliding_window", "hybrid") and self.use_attention_mask:
            raise ValueError(f"{_P}use_attention_mask=True needs {_P}cache_impl='static' (the ring cache of "
                             f"cache_impl={self.cache_impl!r} takes no mask)")
        self._validate_decoder_batch_sizes()
        self._set("lora_config", RBLNLoRAConfig.coerce(self.lora_config))
        if self.lora_config is not None and self.tensor_parallel_size > 1:
            raise ValueError(f"{_P}lora_config with {_P}tensor_parallel_size={self.tensor_parallel_size}: LoRA "
                             "adapters compile for one device only so far; use tensor_parallel_size=1")

        # Rules between options that can be checked as soon as the options are given.
        if self.attn_impl == "eager" and self.kvcache_partition_len is not None:
            raise ValueError(
                f"{_P}kvcache_partition_len={self.kvcache_partition_len} needs flash attention, but "
                f"{_P}attn_impl='eager'; drop one of them (or set {_P}attn_impl='flash_attn')."
            )
        if self.is_resolved:
            self._check_resolved_rules()

    def _validate_decoder_batch_sizes(self) -> None:
        sizes = self.decoder_batch_sizes
        if sizes is None:
            return
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (list, tuple)) or not sizes:
            raise TypeError(f"{_P}decoder_batch_sizes must be a non-empty list of ints; got {sizes!r}")
        for size in sizes:
            check_int("decoder_batch_sizes", size)
            if size > self.batch_size:
                raise ValueError(
                    f"{_P}decoder_batch_sizes entries must be <= {_P}batch_size ({self.batch_size}); got {size}"
                )
        # Buckets are exactly the user's sizes (as on optimum-rbln): largest first, no duplicates.
        self._set("decoder_batch_sizes", tuple(sorted(set(sizes), reverse=True)))

    @property
    def is_resolved(self) -> bool:
        """True when every "pick for me" option has a value (after `finalize`, or a loaded config)."""
        needed = [self.max_seq_len, self.attn_impl, self.kvcache_block_size, self.kvcache_num_blocks,
                  self.decoder_batch_sizes]
        if self.attn_impl == "flash_attn":
            needed.append(self.kvcache_partition_len)
        return all(value is not None for value in needed)

    def _check_resolved_rules(self) -> None:
        """The rules of the real stack that tie the resolved options together."""
        max_seq_len, block = self.max_seq_len, self.kvcache_block_size
        if self.attn_impl == "eager":
            if max_seq_len > MAX_EAGER_SEQ_LEN:
                raise ValueError(
                    f"{_P}max_seq_len={max_seq_len} is above {MAX_EAGER_SEQ_LEN}, the eager attention limit; "
                    f"lower it, or use flash attention by setting {_P}kvcache_partition_len "
                    f"(e.g. {DEFAULT_PARTITION_LEN})."
                )
            if block != max_seq_len:
                raise ValueError(
                    f"{_P}kvcache_block_size={block} must equal {_P}max_seq_len={max_seq_len} with eager "
                    "attention (one block holds a whole sequence)."
                )
        else:
            partition = self.kvcache_partition_len
            # Checked before the 2x-partition rule, which (with partition >= 4096) implies it,
            # so that a too-short context gets the more direct message.
            if max_seq_len < MIN_FLASH_MAX_SEQ_LEN:
                raise ValueError(
                    f"{_P}max_seq_len={max_seq_len} is below {MIN_FLASH_MAX_SEQ_LEN}, the flash attention "
                    "minimum; use eager attention (drop kvcache_partition_len) for shorter contexts."
                )
            if max_seq_len % partition:
                raise ValueError(
                    f"{_P}max_seq_len={max_seq_len} must be a multiple of {_P}kvcache_partition_len={partition}."
                )
            if max_seq_len < 2 * partition:
                raise ValueError(
                    f"{_P}max_seq_len={max_seq_len} must be at least 2 * {_P}kvcache_partition_len={partition} "
                    "(flash attention needs two partitions or more)."
                )
            if block != partition:
                raise ValueError(
                    f"{_P}kvcache_block_size={block} must equal {_P}kvcache_partition_len={partition} with "
                    "flash attention (a block is one partition)."
                )
        # Each batch slot needs at least one block to hold its first tokens (with eager, one block is all it needs).
        if self.kvcache_num_blocks < self.batch_size:
            raise ValueError(
                f"{_P}kvcache_num_blocks={self.kvcache_num_blocks} is less than {_P}batch_size={self.batch_size}; "
                "every batch slot needs at least one KV cache block."
            )
        if self.prefill_chunk_size > max_seq_len:
            raise ValueError(
                f"{_P}prefill_chunk_size={self.prefill_chunk_size} must be <= {_P}max_seq_len={max_seq_len}."
            )

    # What vllm-rbln reads from rbln_config.json, at its top level (optimum-rbln writes a config's
    # options flat there): -> max_num_seqs, max_model_len, max_num_batched_tokens, block_size,
    # num_gpu_blocks, the dtype and the number of devices. optimum-npu itself reads compile_options.
    SERVING_KEYS: ClassVar[tuple[str, ...]] = ("batch_size", "max_seq_len", "prefill_chunk_size", "kvcache_block_size",
                                                "kvcache_partition_len", "kvcache_num_blocks", "dtype", "num_devices")

    @classmethod
    def top_level_keys(cls) -> tuple[str, ...]:
        return cls.SERVING_KEYS

    def to_json_dict(self) -> dict[str, Any]:
        data = super().to_json_dict()
        serving = {**self.compile_options, "num_devices": self.tensor_parallel_size}
        return {**data, **{key: serving[key] for key in self.SERVING_KEYS}}

    def check_top_level_keys(self, data: dict[str, Any], path: str) -> None:
        """Warn when the top-level copies of the serving options differ from compile_options (the
        file was edited by hand): optimum-npu follows compile_options, a vLLM reading the top level
        would size itself for another model."""
        serving = {**self.compile_options, "num_devices": self.tensor_parallel_size}
        for key in self.SERVING_KEYS:
            if key in data and data[key] != serving[key]:
                logger.warning("%s: the top-level %s=%r (what vLLM reads) differs from compile_options (%r), which "
                               "optimum-npu follows: the file was edited by hand. Resize the KV pool with "
                               "`optimum-npu kv-blocks`, or compile again.", path, key, data[key], serving[key])

    @property
    def quantization_spec(self) -> Quantization | None:
        """The parsed `quantization` option (None: nothing quantised)."""
        return Quantization.parse(self.quantization)

    @property
    def blocks_for_full_length(self) -> int:
        """KV blocks needed for every batch slot to reach max_seq_len."""
        return _blocks_for_full_length(self.batch_size, self.max_seq_len, self.kvcache_block_size)

    def finalize(self, hf_config: Any) -> Self:
        """A copy with every None option filled from `hf_config` (a transformers PretrainedConfig), validated.

        Defaults: max_seq_len = max_position_embeddings; attn_impl = "flash_attn" if a partition
        length is given, else "eager"; flash without a partition length uses kvcache_block_size
        if given, else 4096; kvcache_block_size = max_seq_len (eager) / the partition (flash);
        kvcache_num_blocks = enough for every slot at full length; decoder_batch_sizes = (batch_size,).
        Idempotent: finalizing a resolved config only re-checks it.
        """
        max_positions = getattr(hf_config, "max_position_embeddings", None)
        if max_positions is None:  # e.g. GPT-2 style configs
            max_positions = getattr(hf_config, "n_positions", None)
        max_seq_len = self.max_seq_len if self.max_seq_len is not None else max_positions
        if max_seq_len is None:
            raise ValueError(f"{_P}max_seq_len is not set and the model config has no max_position_embeddings; set it.")
        if max_positions is not None and max_seq_len > max_positions:
            raise ValueError(
                f"{_P}max_seq_len={max_seq_len} is above the model's max_position_embeddings={max_positions}."
            )

        attn_impl = self.attn_impl
        if attn_impl is None:
            attn_impl = "flash_attn" if self.kvcache_partition_len is not None else "eager"
        partition = self.kvcache_partition_len
        if attn_impl == "flash_attn" and partition is None:
            partition = self.kvcache_block_size if self.kvcache_block_size is not None else DEFAULT_PARTITION_LEN
        block = self.kvcache_block_size
        if block is None:
            block = max_seq_len if attn_impl == "eager" else partition

        num_blocks = self.kvcache_num_blocks
        if num_blocks is None:
            num_blocks = _blocks_for_full_length(self.batch_size, max_seq_len, block)
        decoder_batch_sizes = self.decoder_batch_sizes if self.decoder_batch_sizes is not None else (self.batch_size,)
        quantization = self.quantization_spec
        if quantization is not None:
            head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
            features = {"hidden_size": hf_config.hidden_size,
                        "num_attention_heads * head_dim": hf_config.num_attention_heads * head_dim}
            if getattr(hf_config, "intermediate_size", None):  # (GPT-2's and OPT's configs name it otherwise)
                features["intermediate_size"] = hf_config.intermediate_size
            quantization.check_in_features(features)
        cache_impl, window, window_layers = self._sliding_window_options(hf_config)
        # replace() re-runs _validate(), which now checks every rule on the resolved values.
        return dataclasses.replace(
            self,
            cache_impl=cache_impl,
            sliding_window=window,
            sliding_window_layers=window_layers,
            max_seq_len=max_seq_len,
            attn_impl=attn_impl,
            kvcache_partition_len=partition,
            kvcache_block_size=block,
            kvcache_num_blocks=num_blocks,
            decoder_batch_sizes=decoder_batch_sizes,
        )

    def _sliding_window_options(self, hf_config: Any) -> tuple[str, int | None, tuple[int, ...] | None]:
        """(cache_impl, sliding_window, sliding_window_layers), checked against the model: a ring cache
        holds the model's own windowed layers with the model's window (another window would change
        what the layers attend to, so it is refused, not obeyed)."""
        from .layouts import layer_sliding_windows

        cache_impl = self.cache_impl or "static"
        if cache_impl == "static":
            return cache_impl, None, None
        windows = layer_sliding_windows(hf_config)
        windowed = tuple(i for i, w in enumerate(windows) if w)
        if not windowed:
            raise ValueError(f"{_P}cache_impl={cache_impl!r}: this model has no sliding-window layers; use 'static'")
        if len({windows[i] for i in windowed}) > 1:
            raise ValueError(f"{_P}cache_impl={cache_impl!r}: the model's layers have different windows "
                             f"{sorted({windows[i] for i in windowed})}; use 'static'")
        if self.sliding_window is not None and self.sliding_window != windows[windowed[0]]:
            raise ValueError(f"{_P}sliding_window={self.sliding_window}: the model's window is {windows[windowed[0]]} "
                             "(another one would change what its layers attend to); leave it unset")
        if self.sliding_window_layers is not None and tuple(self.sliding_window_layers) != windowed:
            raise ValueError(f"{_P}sliding_window_layers={list(self.sliding_window_layers)}: the model's windowed "
                             f"layers are {list(windowed)}; leave it unset")
        every = len(windowed) == len(windows)
        if cache_impl == "sliding_window" and not every:
            raise ValueError(f"{_P}cache_impl='sliding_window' rings every layer, but only layers {list(windowed)} of "
                             f"{len(windows)} have a window; use 'hybrid'")
        if cache_impl == "hybrid" and every:
            raise ValueError(f"{_P}cache_impl='hybrid' mixes ring and full caches, but every layer has a window; use "
                             "'sliding_window'")
        return cache_impl, windows[windowed[0]], windowed

    @property
    def ring_layers(self) -> tuple[int, ...]:
        """The layers whose K/V live in a ring of `ring_len` positions (none with cache_impl 'static')."""
        return () if self.cache_impl in (None, "static") else tuple(self.sliding_window_layers or ())

    @property
    def ring_len(self) -> int:
        """Positions of a ring: a chunk's queries see the window's last positions and the chunk's own."""
        return (self.sliding_window or 0) + self.prefill_chunk_size - 1

    def resolve_num_blocks(self, free_bytes_per_device: int, bytes_per_block: int) -> int:
        """How many KV blocks to allocate when the user left kvcache_num_blocks unset.

        The model calls it at compile time, once it knows the device memory left after the
        weights (`free_bytes_per_device`) and the size of one block on one device
        (`bytes_per_block`, all layers, K and V, this device's share under tensor parallelism).
        Returns min(blocks for every slot at full length, blocks that fit). With flash attention
        that may be fewer than the full-length need: slots then share a pool of blocks, as with
        vLLM's paged attention. Raises ValueError if not even one block per batch slot fits.

        A value the user set explicitly is kept as is (check `kvcache_num_blocks` on the config
        from `from_kwargs`, before `finalize`); replace the result in with
        `dataclasses.replace(config, kvcache_num_blocks=n)`.
        """
        if not self.is_resolved:
            raise RuntimeError("resolve_num_blocks() needs a finalized config; call finalize(hf_config) first.")
        if free_bytes_per_device < 0 or bytes_per_block <= 0:
            raise ValueError(
                "resolve_num_blocks needs free_bytes_per_device >= 0 and bytes_per_block > 0; "
                f"got {free_bytes_per_device} and {bytes_per_block}"
            )
        fits = free_bytes_per_device // bytes_per_block
        if fits < self.batch_size:
            raise ValueError(
                f"The KV cache does not fit: {free_bytes_per_device} bytes free per device hold {fits} block(s) "
                f"of {bytes_per_block} bytes, but {_P}batch_size={self.batch_size} needs at least one block per "
                f"slot. Lower {_P}batch_size or {_P}max_seq_len / {_P}kvcache_partition_len, or use a larger npu."
            )
        return min(self.blocks_for_full_length, fits)


def _blocks_for_full_length(batch_size: int, max_seq_len: int, block_size: int) -> int:
    return batch_size * math.ceil(max_seq_len / block_size)


class RBLNLlamaForCausalLMConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNLlamaForCausalLM."""


class RBLNQwen2ForCausalLMConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNQwen2ForCausalLM."""


class RBLNQwen3ForCausalLMConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNQwen3ForCausalLM."""


class RBLNMistralForCausalLMConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNMistralForCausalLM. The sliding window comes from the HF config, not an option."""


class RBLNPhi3ForCausalLMConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNPhi3ForCausalLM."""


class RBLNGPT2LMHeadModelConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNGPT2LMHeadModel. max_seq_len defaults to the checkpoint's n_positions."""


class RBLNOPTForCausalLMConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNOPTForCausalLM."""


class RBLNGemma2ForCausalLMConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNGemma2ForCausalLM. Sliding-window layers and soft caps come from the HF config."""


class RBLNGemma3ForCausalLMConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNGemma3ForCausalLM (Gemma 3's text decoder, model_type gemma3_text)."""


class RBLNMixtralForCausalLMConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNMixtralForCausalLM."""


class RBLNQwen3MoeForCausalLMConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of RBLNQwen3MoeForCausalLM."""


class RBLNDecoderOnlyModelConfig(RBLNDecoderOnlyModelForCausalLMConfig):
    """Options of a headless decoder (an embedding model, a sequence classifier): a prefill graph only,
    the causal LM's options otherwise (`decoder_batch_sizes` stays unset: there is no decode graph)."""

    def _validate_decoder_batch_sizes(self) -> None:
        if self.decoder_batch_sizes:
            raise ValueError(f"{_P}decoder_batch_sizes: a headless decoder compiles no decode graphs; leave it unset "
                             f"(got {self.decoder_batch_sizes!r})")
        if self.decoder_batch_sizes is not None:
            self._set("decoder_batch_sizes", ())

    def finalize(self, hf_config: Any) -> Self:
        return RBLNDecoderOnlyModelForCausalLMConfig.finalize(dataclasses.replace(self, decoder_batch_sizes=()),
                                                              hf_config)


class RBLNQwen3ModelConfig(RBLNDecoderOnlyModelConfig):
    """Options of RBLNQwen3Model."""


class RBLNQwen3ForSequenceClassificationConfig(RBLNDecoderOnlyModelConfig):
    """Options of RBLNQwen3ForSequenceClassification."""
