"""Whisper speech recognition on the encoder-decoder machinery, against transformers.

A tiny random Whisper (`optimum_npu.testing.seq2seq.build_tiny_whisper`: 2 + 2 layers, d_model
32, 16 mel bins, a 1 s window of 100 frames) with its feature extractor and a byte-level
tokenizer, compiled at rbln_batch_size=2. Audio: sine sweeps made here with numpy (1 s and
0.6 s, padded by the feature extractor). Reference: the HF model in fp32, its own generate()
and ASR pipeline (num_beams=1: beam search is not run on the NPU).

- exact numerics: generated tokens equal transformers' token for token (language and task
  given: a 4-token decoder prefix; language detected: the detection pass runs the model's
  forward), forward logits within 1e-4, the pipeline's texts equal;
- device numerics (bf16, heavy tier): forward logits within 5% of their largest magnitude.
"""

from __future__ import annotations

import pytest
import torch
from llm_fixtures import _one_torch_thread  # noqa: F401  (module fixture)
from transformers import AutoProcessor, WhisperFeatureExtractor, WhisperForConditionalGeneration
from transformers import pipeline as transformers_pipeline

from optimum_npu import (
    RBLNAutoModel,
    RBLNAutoModelForSpeechSeq2Seq,
    RBLNWhisperForConditionalGeneration,
    pipeline,
)
from optimum_npu.modeling import base
from optimum_npu.testing.seq2seq import build_tiny_whisper, tone


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper")


@pytest.fixture(scope="module")
def hf(source):
    return WhisperForConditionalGeneration.from_pretrained(source).eval()


@pytest.fixture(scope="module")
def model(source):
    return RBLNWhisperForConditionalGeneration.from_pretrained(source, export=True, rbln_batch_size=2,
                                                               rbln_numerics="exact")


@pytest.fixture(scope="module")
def features(source):
    extractor = WhisperFeatureExtractor.from_pretrained(source)
    return extractor([tone(1.0), tone(0.6)], sampling_rate=16_000, return_tensors="pt").input_features


def test_generate_equals_transformers(model, hf, features):
    for kwargs in ({"language": "en", "task": "transcribe"}, {}):   # given; detected by a forward pass
        expected = hf.generate(features, max_new_tokens=10, **kwargs)
        assert torch.equal(model.generate(features, max_new_tokens=10, **kwargs), expected), kwargs
    assert model.generation_stats.batch_size == 2 and model.generation_stats.ttft_s > 0
    alone = model.generate(features[1:], language="en", max_new_tokens=10)   # the compiled batch padded
    assert torch.equal(alone, hf.generate(features[1:], language="en", max_new_tokens=10))


def test_forward_logits_equal_transformers(model, hf, features):
    prefix = torch.tensor([[257, 258, 259, 261, 70, 71]] * 2)
    out = model(input_features=features, decoder_input_ids=prefix)
    expected = hf(input_features=features, decoder_input_ids=prefix)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.encoder_last_hidden_state, expected.encoder_last_hidden_state, atol=1e-4, rtol=1e-4)


def test_asr_pipeline_on_the_compiled_folder(model, source, tmp_path, monkeypatch):
    folder = model.save_pretrained(tmp_path / "compiled")

    def refuse(*args, **kwargs):
        raise AssertionError("loading a compiled folder must not compile")

    monkeypatch.setattr(base, "compile_from_torch", refuse)
    processor = AutoProcessor.from_pretrained(folder)   # the feature extractor and tokenizer saved with the graphs
    assert processor.feature_extractor.nb_max_frames == 100 and processor.tokenizer.pad_token == "<|endoftext|>"
    assert type(RBLNAutoModel.from_pretrained(folder, rbln_create_runtimes=False)) is RBLNWhisperForConditionalGeneration
    asr = pipeline("automatic-speech-recognition", model=folder)   # feature extractor and tokenizer from the folder
    reference = transformers_pipeline("automatic-speech-recognition", model=str(source))
    audio = [tone(1.0), tone(0.6), tone(0.3)]
    texts = asr(audio, batch_size=2, generate_kwargs={"max_new_tokens": 8})
    expected = reference(audio, batch_size=2, generate_kwargs={"max_new_tokens": 8, "num_beams": 1})
    assert texts == expected and len(texts) == 3


def test_auto_classes_pick_whisper(source):
    assert RBLNAutoModelForSpeechSeq2Seq.class_for(source, export=True) is RBLNWhisperForConditionalGeneration
    assert RBLNAutoModel.class_for(source, export=True, task="automatic-speech-recognition") is \
        RBLNWhisperForConditionalGeneration


def test_bad_options_and_inputs_are_clear_errors(model, hf, features):
    with pytest.raises(ValueError, match="rbln_enc_max_seq_len must be 50 for WhisperForConditionalGeneration"):
        RBLNWhisperForConditionalGeneration.from_model(hf, rbln_enc_max_seq_len=40)
    with pytest.raises(ValueError, match="rbln_dec_max_seq_len=64 is above the 32 positions"):
        RBLNWhisperForConditionalGeneration.from_model(hf, rbln_dec_max_seq_len=64)
    with pytest.raises(ValueError, match="rbln_token_timestamps=True is not supported"):
        RBLNWhisperForConditionalGeneration.from_model(hf, rbln_token_timestamps=True)
    with pytest.raises(ValueError, match="return_timestamps"):
        model.generate(features, return_timestamps=True)
    with pytest.raises(ValueError, match="long-form transcription is not supported"):
        model.generate(torch.cat([features, features], dim=-1))
    with pytest.raises(ValueError, match=r"input_features must be a float tensor \[batch, 16, 100\]"):
        model(input_features=features[:, :8], decoder_input_ids=torch.tensor([[257]] * 2))
    with pytest.raises(ValueError, match="larger than the compiled rbln_batch_size=2"):
        model.generate(features.repeat(2, 1, 1), language="en")
    with pytest.raises(ValueError, match="beam search"):
        model.generate(features, num_beams=3)


@pytest.mark.heavy
def test_device_numerics_logits_within_bf16_tolerance(hf, features, source):
    model = RBLNWhisperForConditionalGeneration.from_pretrained(source, export=True, rbln_batch_size=2)
    prefix = torch.tensor([[257, 258, 259, 261, 70, 71]] * 2)
    logits = model(input_features=features, decoder_input_ids=prefix).logits
    expected = hf(input_features=features, decoder_input_ids=prefix).logits
    assert (logits - expected).abs().max() <= 0.05 * expected.abs().max()
