"""Tiny random encoder-decoder checkpoints: Whisper (with its feature extractor and a byte-level
tokenizer), T5 and BART (with a tokenizer), and a test tone to transcribe.

- `build_tiny_whisper(folder)`: 2 + 2 layers, d_model 32, 16 mel bins, a 1 s window (100 mel
  frames, 50 encoder positions), a byte-level BPE tokenizer (256 byte tokens, no merges) with
  Whisper's special tokens, and a generation config with English, transcribe / translate and
  no-timestamps tokens, so `generate(language="en", task="transcribe")` and the ASR pipeline
  take the real path. The transcription is noise: the weights are random.
- `build_tiny_t5(folder)` / `build_tiny_bart(folder)`: text-to-text models with the T5
  tokenizer of the diffusers stand-ins.
- `tone(seconds)`: a 16 kHz sine sweep as a float32 numpy array (audio made here, no audio library).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SAMPLING_RATE = 16_000
WHISPER_SPECIAL_TOKENS = ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|translate|>", "<|notimestamps|>")


def _whisper_tokenizer():
    """A byte-level BPE tokenizer with no merges (one token per byte) and Whisper's special tokens."""
    from transformers import WhisperTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    return WhisperTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>",
                            additional_special_tokens=list(WHISPER_SPECIAL_TOKENS))


def build_tiny_whisper(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A random tiny Whisper checkpoint with its feature extractor and tokenizer; returns the folder."""
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    folder = Path(folder)
    tokenizer = _whisper_tokenizer()
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sot, en, transcribe, translate, no_timestamps = tokenizer.convert_tokens_to_ids(list(WHISPER_SPECIAL_TOKENS))
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=16, encoder_layers=2, decoder_layers=2, d_model=32,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=50, max_target_positions=32, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        decoder_start_token_id=sot, suppress_tokens=[], begin_suppress_tokens=[eot], init_std=0.2)).eval()
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, max_length=32,
        is_multilingual=True, lang_to_id={"<|en|>": en}, task_to_id={"transcribe": transcribe, "translate": translate},
        no_timestamps_token_id=no_timestamps, suppress_tokens=[], begin_suppress_tokens=[eot])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=16, sampling_rate=SAMPLING_RATE, hop_length=160, chunk_length=1,
                            n_fft=400).save_pretrained(folder)
    return folder


def _save_with_t5_tokenizer(folder, build_model, seed: int) -> Path:
    """`build_model(tokenizer)` (a random model sized to the tokenizer) saved with the tokenizer into `folder`."""
    import torch

    from .diffusers import _tiny_t5_tokenizer

    folder = Path(folder)
    tokenizer = _tiny_t5_tokenizer()
    torch.manual_seed(seed)
    build_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_t5(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A random tiny T5ForConditionalGeneration with a T5 tokenizer; returns the folder."""
    from transformers import T5Config, T5ForConditionalGeneration

    return _save_with_t5_tokenizer(folder, lambda tok: T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, d_ff=64,
        decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)), seed)


def build_tiny_bart(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A random tiny BartForConditionalGeneration (512 positions) with a T5 tokenizer; returns the folder."""
    from transformers import BartConfig, BartForConditionalGeneration

    return _save_with_t5_tokenizer(folder, lambda tok: BartForConditionalGeneration(BartConfig(
        vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id)), seed)


def tone(seconds: float = 1.0, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """A sine sweep from 200 Hz to 2 kHz, float32 in [-0.5, 0.5], made here (no audio file or library)."""
    t = np.arange(int(seconds * sampling_rate)) / sampling_rate
    frequency = 200.0 + 1800.0 * t / max(seconds, 1e-9)
    return (0.5 * np.sin(2 * np.pi * np.cumsum(frequency) / sampling_rate)).astype(np.float32)
