"""Options of a compiled encoder-decoder model (T5, BART, Whisper), as on optimum-rbln.

The options are flat, with optimum-rbln's names: `enc_max_seq_len` (the encoder graph's
input length, shorter inputs padded and masked) and `dec_max_seq_len` (the self-attention
cache: prompt prefix plus generated tokens), beside the base `batch_size`, `npu`, `dtype`,
`numerics` and runtime options. Both graphs of a model share one set: the encoder and the
decoder are compiled together (the decoder reads the cache the encoder writes), so no option
differs between them; a `submodules`-style nested config would hold one sub-config per graph
with these same fields, were per-graph options (devices, batch) ever wanted.

Left None, `resolve(hf_config)` fills them from the HF config (the model's position limits),
and checks what is given against them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from optimum_npu.configuration import OPTION_PREFIX, RBLNModelConfig, check_bool, check_int


@dataclass(frozen=True, kw_only=True)
class RBLNModelForSeq2SeqLMConfig(RBLNModelConfig):
    """Compile-time options of an encoder-decoder model (plus the base npu / dtype / batch_size / ...)."""

    # Whether the encoder length is the model's own (Whisper: always 30 s of audio) rather than a choice.
    fixed_encoder_length: ClassVar[bool] = False

    enc_max_seq_len: int | None = None    # None: the model's encoder position limit (T5 has none: set it)
    dec_max_seq_len: int | None = None    # None: the model's decoder position limit (T5 has none: set it)

    def _validate(self) -> None:
        super()._validate()
        check_int("enc_max_seq_len", self.enc_max_seq_len, allow_none=True)
        check_int("dec_max_seq_len", self.dec_max_seq_len, allow_none=True)
        if self.tensor_parallel_size != 1:
            raise ValueError(f"{OPTION_PREFIX}tensor_parallel_size must be 1 for an encoder-decoder model (the "
                             f"encoder and decoder run whole on one device each); got {self.tensor_parallel_size}")

    def resolve(self, enc_limit: int | None, dec_limit: int | None, model: str):
        """A copy with both lengths set: left None, the model's limits; given, at most those limits.
        `enc_limit` / `dec_limit`: the HF config's position limits (None: it has none)."""
        values = {}
        for name, given, limit in (("enc_max_seq_len", self.enc_max_seq_len, enc_limit),
                                   ("dec_max_seq_len", self.dec_max_seq_len, dec_limit)):
            if given is None and limit is None:
                raise ValueError(f"{OPTION_PREFIX}{name} is not set and {model} has no position limit to take it "
                                 f"from; set it (e.g. {OPTION_PREFIX}{name}=512)")
            if given is not None and limit is not None and given > limit:
                raise ValueError(f"{OPTION_PREFIX}{name}={given} is above the {limit} positions {model} has")
            if name == "enc_max_seq_len" and self.fixed_encoder_length and given not in (None, limit):
                raise ValueError(f"{OPTION_PREFIX}enc_max_seq_len must be {limit} for {model} (its encoder takes "
                                 f"a fixed {limit}-position input); got {given}. Leave it unset.")
            values[name] = limit if given is None else given
        return dataclasses.replace(self, **values)


class RBLNT5ForConditionalGenerationConfig(RBLNModelForSeq2SeqLMConfig):
    """Options of RBLNT5ForConditionalGeneration (T5 has no position limit: set both lengths)."""


class RBLNBartForConditionalGenerationConfig(RBLNModelForSeq2SeqLMConfig):
    """Options of RBLNBartForConditionalGeneration."""


@dataclass(frozen=True, kw_only=True)
class RBLNWhisperForConditionalGenerationConfig(RBLNModelForSeq2SeqLMConfig):
    """Options of RBLNWhisperForConditionalGeneration. The encoder takes the model's whole window
    (max_source_positions), so only `dec_max_seq_len` is a choice (default max_target_positions)."""

    fixed_encoder_length: ClassVar[bool] = True

    token_timestamps: bool = False        # optimum-rbln's option; timestamps are not supported here

    def _validate(self) -> None:
        super()._validate()
        check_bool("token_timestamps", self.token_timestamps)
        if self.token_timestamps:
            raise ValueError(f"{OPTION_PREFIX}token_timestamps=True is not supported: the decoder graph does not "
                             "return cross-attention weights; compile with token_timestamps=False (the default) "
                             "and generate with return_timestamps=False")
