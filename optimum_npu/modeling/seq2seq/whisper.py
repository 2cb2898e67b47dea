"""Whisper speech recognition: the encoder-decoder machinery with a log-mel encoder, and
transformers' own Whisper `generate()` (language / task tokens, suppression, no-speech logic)
on it, timestamps off.

The encoder graph takes the feature extractor's `input_features` [batch, num_mel_bins,
2 * max_source_positions] (Whisper's fixed 30 s window; shorter audio is padded by the
feature extractor) and fills the cross-attention cache; the decoder is BART's layer in
pre-norm order with learned positions. `pipeline("automatic-speech-recognition")` works on
a compiled model or folder (`optimum_npu.pipeline` loads the feature extractor and tokenizer
saved in it).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import WhisperForConditionalGeneration
from transformers.models.whisper.generation_whisper import WhisperGenerationMixin

from ..transformers_pipelines import list_for_pipelines
from .configuration_seq2seq import RBLNWhisperForConditionalGenerationConfig
from .families import TokenAndPositionEmbedding, bart_style_graphs, bart_style_shape
from .modeling_seq2seq import RBLNModelForSeq2SeqLM, Seq2SeqShape

# The strides of WhisperEncoder's two convolutions (fixed by its architecture): the encoder takes
# 2 * max_source_positions mel frames. Whisper's generate() reads them from `model.encoder`.
CONV_STRIDES = (1, 2)


class AudioEncoder(nn.Module):
    """input_features -> the HF Whisper encoder's last hidden state."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_features=input_features, return_dict=True).last_hidden_state


class NormAndProjection(nn.Module):
    """Whisper's head: the decoder's final layer norm, then proj_out."""

    def __init__(self, norm: nn.Module, proj: nn.Module):
        super().__init__()
        self.norm, self.proj = norm, proj

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden))


class RBLNWhisperForConditionalGeneration(WhisperGenerationMixin, RBLNModelForSeq2SeqLM):
    """Whisper (any size) for speech recognition; `generate(input_features, language=..., task=...)`
    as in transformers, with `return_timestamps=False`."""

    hf_class = WhisperForConditionalGeneration
    config_class = RBLNWhisperForConditionalGenerationConfig
    main_input_name = "input_features"
    input_modalities = ("audio",)

    # ---- the mapping ----------------------------------------------------------------------

    @classmethod
    def _shape(cls, hf_config) -> Seq2SeqShape:
        return bart_style_shape(hf_config)

    @classmethod
    def _position_limits(cls, hf_config):
        return hf_config.max_source_positions, hf_config.max_target_positions

    @classmethod
    def _encoder_input_info(cls, hf_config, config):
        frames = hf_config.max_source_positions * CONV_STRIDES[0] * CONV_STRIDES[1]
        return [("input_features", (config.batch_size, hf_config.num_mel_bins, frames), "float32")]

    @classmethod
    def _graph_modules(cls, hf_model, config):
        stack = hf_model.model.decoder
        embed = TokenAndPositionEmbedding(stack.embed_tokens, stack.embed_positions, 0)
        return bart_style_graphs(cls, hf_model, config, AudioEncoder(hf_model.model.encoder), embed,
                                 NormAndProjection(stack.layer_norm, hf_model.proj_out), pre_norm=True,
                                 encoder_shared=None, decoder_shared=stack.embed_tokens)

    # ---- running ----------------------------------------------------------------------------

    def _encoder_inputs(self, inputs, attention_mask):
        """input_features as the encoder graph takes them; every encoder position is real (Whisper
        attends to the whole window, padding included, as transformers does)."""
        (_, expected, _), = self._encoder_input_info(self.config, self.rbln_config)
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() != 3 \
                or tuple(inputs.shape[1:]) != expected[1:] or inputs.shape[0] == 0:
            got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"input_features must be a float tensor [batch, {expected[1]}, {expected[2]}] (log-mel "
                             f"frames of the model's 30 s window, as its feature extractor makes them); got {got}")
        rows = inputs.shape[0]
        return [inputs.float()], torch.ones((rows, self.rbln_config.enc_max_seq_len), dtype=torch.int64)

    @property
    def model(self):
        """What Whisper's generate() reads of the HF model's `model`: its encoder's convolution strides."""
        conv = [SimpleNamespace(stride=(s,)) for s in CONV_STRIDES]
        return SimpleNamespace(encoder=SimpleNamespace(conv1=conv[0], conv2=conv[1]), config=self.config)

    def generate(self, input_features=None, generation_config=None, **kwargs):
        """transformers' Whisper generate (short-form: one 30 s window per row), timestamps off."""
        if kwargs.get("return_timestamps") or kwargs.get("return_token_timestamps"):
            raise ValueError("return_timestamps / return_token_timestamps are not supported: the compiled decoder "
                             "does not return cross-attention weights; pass return_timestamps=False")
        if input_features is not None and isinstance(input_features, torch.Tensor) and input_features.dim() == 3:
            (_, expected, _), = self._encoder_input_info(self.config, self.rbln_config)
            if input_features.shape[-1] > expected[2]:
                raise ValueError(f"input_features has {input_features.shape[-1]} frames, more than the model's "
                                 f"{expected[2]}-frame window: long-form transcription is not supported; split the audio")
        return super().generate(input_features, generation_config=generation_config, **kwargs)


list_for_pipelines("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING", [RBLNWhisperForConditionalGeneration])
