"""Encoder-decoder text generation (T5, BART) on the two-graph machinery, against transformers.

Tiny random models (d_model 32, 2 + 2 layers, 4 heads, vocabulary 96) compiled once per family
at rbln_batch_size=2, rbln_enc_max_seq_len=16, rbln_dec_max_seq_len=16, fed a batch of 2 inputs
of 7 tokens, one padded to 5. Reference: the HF model in fp32 (its own generate / forward).

- exact numerics (fp32 on the host): greedy tokens equal transformers' token for token, and
  forward logits within 1e-4 (fp32 summation order: the decoder attends over the whole compiled
  cache, masked);
- device numerics (bf16): forward logits within 5% of the logits' largest magnitude (8 mantissa
  bits through 4 layers); tokens are not compared (16-bit logits may swap near-ties).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llm_fixtures import _one_torch_thread  # noqa: F401  (module fixture)
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

from optimum_npu import (
    DeviceMemoryError,
    RBLNAutoModel,
    RBLNAutoModelForSeq2SeqLM,
    RBLNBartForConditionalGeneration,
    RBLNModelForSeq2SeqLM,
    RBLNT5EncoderModel,
    RBLNT5ForConditionalGeneration,
)
from optimum_npu.modeling import base

VOCAB = 96
OPTIONS = dict(rbln_batch_size=2, rbln_enc_max_seq_len=16, rbln_dec_max_seq_len=16)


def make(family: str, varied: bool = True):
    """The tiny model; `varied`: T5 with a larger init than the default, so that greedy tokens vary (not one
    token repeated), at the price of large activations that 16-bit numerics cannot follow (transformers' own
    bf16 model is 75% off its fp32 logits there): device numerics are tested on the default init."""
    torch.manual_seed(0)
    if family == "t5":
        return T5ForConditionalGeneration(T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, d_ff=64,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=8.0 if varied else 1.0)).eval()
    hf = BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, init_std=0.2))
    with torch.no_grad():
        hf.final_logits_bias.normal_(std=0.1)   # zeros by default: make the compiled model prove it adds it
    return hf.eval()


RBLN_CLASS = {"t5": RBLNT5ForConditionalGeneration, "bart": RBLNBartForConditionalGeneration}


@pytest.fixture(scope="module", params=["t5", "bart"])
def exact(request, tmp_path_factory):
    """(HF model, its compiled model in exact numerics, the checkpoint folder with a tokenizer)."""
    from optimum_npu.testing.diffusers import _tiny_t5_tokenizer

    hf = make(request.param)
    source = tmp_path_factory.mktemp(request.param) / "checkpoint"
    hf.save_pretrained(source)
    _tiny_t5_tokenizer().save_pretrained(source)
    model = RBLNAutoModelForSeq2SeqLM.from_pretrained(source, export=True, rbln_numerics="exact", **OPTIONS)
    assert type(model) is RBLN_CLASS[request.param]   # T5: from the architectures, not the T5 encoder class
    return hf, model, source


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def test_greedy_tokens_equal_transformers(exact):
    hf, model, _ = exact
    ids, mask = batch()
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert len(set(expected[0].tolist())) > 3, "the tiny model should not repeat one token"
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, expected)
    stats = model.generation_stats
    assert stats.batch_size == 2 and stats.prompt_tokens == [7, 5] and stats.ttft_s > 0 and stats.tpot_s > 0
    # One row alone: the compiled batch is padded (the padding row writes no cache).
    alone = model.generate(input_ids=ids[1:, :5], max_new_tokens=12, do_sample=False)
    assert torch.equal(alone, hf.generate(input_ids=ids[1:, :5], max_new_tokens=12, do_sample=False))


def test_sampling_with_a_seed_equals_transformers(exact):
    hf, model, _ = exact
    ids, mask = batch()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, temperature=1.5)
    torch.manual_seed(7)
    expected = hf.generate(**kwargs)
    torch.manual_seed(7)
    assert torch.equal(model.generate(**kwargs), expected)


def test_forward_logits_equal_transformers(exact):
    hf, model, _ = exact
    ids, mask = batch()
    decoder_ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.encoder_last_hidden_state[mask.bool()],
                               expected.encoder_last_hidden_state[mask.bool()], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["t5", pytest.param("bart", marks=pytest.mark.heavy)])
def test_device_numerics_logits_within_bf16_tolerance(family):
    hf = make(family, varied=False)
    model = RBLN_CLASS[family].from_model(hf, **OPTIONS)   # device numerics, bf16
    ids, mask = batch()
    decoder_ids = torch.randint(2, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert (logits - expected).abs().max() <= 0.05 * expected.abs().max()


def test_save_and_load_without_recompiling_with_the_tokenizer(exact, tmp_path, monkeypatch):
    hf, model, source = exact
    ids, mask = batch()
    before = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    folder = model.save_pretrained(tmp_path / "compiled")

    def refuse(*args, **kwargs):
        raise AssertionError("loading a compiled folder must not compile")

    monkeypatch.setattr(base, "compile_from_torch", refuse)
    loaded = RBLNAutoModel.from_pretrained(folder)
    assert type(loaded) is type(model)
    assert torch.equal(loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6), before)
    tokens = AutoTokenizer.from_pretrained(folder)(["a prompt"], return_tensors="pt")   # the checkpoint's tokenizer
    assert torch.equal(loaded.generate(**tokens, max_new_tokens=3), hf.generate(**tokens, max_new_tokens=3))


def test_a_folder_whose_options_contradict_its_graphs_is_refused(exact, tmp_path):
    _, model, _ = exact
    folder = Path(model.save_pretrained(tmp_path / "compiled"))
    data = json.loads((folder / "rbln_config.json").read_text())
    data["compile_options"]["dec_max_seq_len"] = 8   # the decoder's self-attention cache holds 16 positions
    (folder / "rbln_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="dec_max_seq_len=8.*do not belong together"):
        RBLNAutoModel.from_pretrained(folder, rbln_create_runtimes=False)


def test_auto_classes_pick_the_family_from_the_model_type(tmp_path):
    make("bart").save_pretrained(tmp_path / "bart")
    make("t5").save_pretrained(tmp_path / "t5")
    assert RBLNAutoModelForSeq2SeqLM.class_for(tmp_path / "bart", export=True) is RBLNBartForConditionalGeneration
    assert RBLNAutoModelForSeq2SeqLM.class_for(tmp_path / "t5", export=True) is RBLNT5ForConditionalGeneration
    assert RBLNAutoModel.class_for(tmp_path / "t5", export=True, task="text2text-generation") is \
        RBLNT5ForConditionalGeneration
    assert RBLNModelForSeq2SeqLM._family_for(make("bart").config) is RBLNBartForConditionalGeneration
    with pytest.raises(ValueError, match="RBLNT5EncoderModel compiles model_type t5"):
        RBLNT5EncoderModel.from_model(make("bart"), rbln_max_seq_len=8)


def test_bad_options_and_inputs_are_clear_errors(exact):
    hf, model, _ = exact
    t5 = make("t5")
    with pytest.raises(ValueError, match="rbln_enc_max_seq_len is not set and T5ForConditionalGeneration has no"):
        RBLNT5ForConditionalGeneration.from_model(t5, rbln_dec_max_seq_len=8)
    with pytest.raises(ValueError, match="rbln_dec_max_seq_len=64 is above the 32 positions"):
        RBLNBartForConditionalGeneration.from_model(make("bart"), rbln_dec_max_seq_len=64)
    with pytest.raises(TypeError, match="rbln_batch_size must be an int"):
        RBLNT5ForConditionalGeneration.from_model(t5, rbln_batch_size="2")
    with pytest.raises(ValueError, match="rbln_enc_max_seq_len must be >= 1"):
        RBLNT5ForConditionalGeneration.from_model(t5, rbln_enc_max_seq_len=0, rbln_dec_max_seq_len=8)
    with pytest.raises(ValueError, match="Did you mean rbln_dec_max_seq_len"):
        RBLNT5ForConditionalGeneration.from_model(t5, rbln_dec_max_seqlen=8)
    with pytest.raises(DeviceMemoryError, match="needs at least 16.* lower rbln_batch_size, rbln_dec_max_seq_len"):
        RBLNT5ForConditionalGeneration.from_model(t5, rbln_batch_size=8192, rbln_enc_max_seq_len=4096,
                                                  rbln_dec_max_seq_len=4096)   # refused before any cache exists
    with pytest.raises(ValueError, match="rbln_tensor_parallel_size must be 1"):
        RBLNT5ForConditionalGeneration.from_model(t5, rbln_tensor_parallel_size=2, **OPTIONS)
    ids, mask = batch()
    with pytest.raises(ValueError, match="larger than the compiled rbln_batch_size=2"):
        model.generate(input_ids=ids.repeat(2, 1), max_new_tokens=2)
    with pytest.raises(ValueError, match="more than rbln_enc_max_seq_len=16"):
        model.generate(input_ids=ids.repeat(1, 3), max_new_tokens=2)
    with pytest.raises(ValueError, match="more than rbln_dec_max_seq_len=16"):
        model.generate(input_ids=ids, max_new_tokens=17)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(input_ids=ids, num_beams=2)
    with pytest.raises(ValueError, match="encoder_outputs must be what this model's encoder returned last"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=True, num_return_sequences=2)
    with pytest.raises(ValueError, match="encoder_outputs must be what this model's encoder returned last"):
        model(encoder_outputs=hf.get_encoder()(ids), decoder_input_ids=ids[:, :1])
    with pytest.raises(ValueError, match="outside this model's vocabulary"):
        model.generate(input_ids=ids + VOCAB, max_new_tokens=2)
