"""Text encoders (BERT, CLIP text, T5 encoder) on the single-graph base, against transformers.

Tiny random models (hidden 32, 2 layers) compiled at rbln_batch_size=2, rbln_max_seq_len=16,
fed 3 rows of 10 tokens (one row with padding): the call is split into a full and a padded
run, and each row is padded from 10 to 16 tokens. Reference: the HF model in fp32 on the
unpadded input. Tolerances: exact numerics ~1e-5 (fp32 summation order); bf16 device numerics
within 5% of the output's scale (8 mantissa bits through 2 layers).
"""

from __future__ import annotations

import pytest
import torch
from llm_fixtures import _one_torch_thread  # noqa: F401  (module fixture)
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from optimum_npu import (
    RBLNBertModel,
    RBLNCLIPTextModel,
    RBLNCLIPTextModelWithProjection,
    RBLNT5EncoderModel,
)
from optimum_npu.modeling import base

VOCAB = 100
OPTIONS = dict(rbln_batch_size=2, rbln_max_seq_len=16)


def make(family: str):
    clip = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    hf = {
        "bert": lambda: BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=64)),
        "clip": lambda: CLIPTextModel(CLIPTextConfig(**clip)),
        "clip_projection": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**clip, projection_dim=24)),
        "t5": lambda: T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, num_layers=2, num_heads=2, d_ff=64)),
    }[family]()
    return hf.eval()


RBLN_CLASS = {"bert": RBLNBertModel, "clip": RBLNCLIPTextModel, "clip_projection": RBLNCLIPTextModelWithProjection,
              "t5": RBLNT5EncoderModel}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (3, 10))
    ids[:, -1] = 2  # CLIP pools at the end-of-text token
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def assert_close(actual: torch.Tensor, expected: torch.Tensor, numerics: str, mask=None):
    if mask is not None:  # hidden states of padding positions are not part of the contract
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    if numerics == "exact":
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    else:
        scale = expected.abs().max().item()
        assert (actual - expected).abs().max().item() <= 0.05 * scale


@pytest.mark.parametrize("numerics", ["exact", "device"])
@pytest.mark.parametrize("family", list(RBLN_CLASS))
def test_encoder_matches_transformers(family, numerics):
    hf = make(family)
    model = RBLN_CLASS[family].from_model(hf, rbln_numerics=numerics, rbln_output_hidden_states=True, **OPTIONS)
    ids, mask = batch()
    out = model(ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert type(out) is type(ref) or set(out.keys()) == set(ref.keys()) - {"attentions"}
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (3, 10, 32)
    assert_close(out.last_hidden_state, ref.last_hidden_state, numerics, mask)
    for field in ("pooler_output", "text_embeds"):
        if field in ref:
            assert_close(out[field], ref[field], numerics)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert_close(mine, theirs, numerics, mask)
    stats = model.inference_stats
    assert (stats.samples, stats.runs, stats.compiled_batch_size) == (3, 2, 2) and stats.device_s > 0
    if family.startswith("clip"):  # clip_skip's path: an earlier layer's hidden states through the final norm
        hf_norm = next(m for name, m in hf.named_modules() if name.endswith("final_layer_norm"))
        with torch.no_grad():
            expected = hf_norm(ref.hidden_states[-2])
        assert_close(model.text_model.final_layer_norm(out.hidden_states[-2]), expected, numerics, mask)


def test_split_and_padded_batches_equal_single_calls():
    model = RBLNT5EncoderModel.from_model(make("t5"), **OPTIONS)
    ids, mask = batch()
    together = model(ids, attention_mask=mask).last_hidden_state
    for row in range(3):
        alone = model(ids[row : row + 1], attention_mask=mask[row : row + 1]).last_hidden_state
        assert torch.equal(alone[0][mask[row].bool()], together[row][mask[row].bool()])


def test_the_calls_a_diffusers_pipeline_makes():
    """StableDiffusionPipeline.encode_prompt: `text_encoder(ids, attention_mask=None)[0]`, `.dtype`;
    CosmosTextToWorldPipeline: `text_encoder(ids, attention_mask=bool_mask).last_hidden_state`."""
    clip = RBLNCLIPTextModel.from_model(make("clip"), rbln_numerics="exact", **OPTIONS)
    ids = torch.randint(3, VOCAB, (2, 16))
    ids[:, -1] = 2
    first = clip(ids, attention_mask=None)[0]
    assert first.shape == (2, 16, 32) and first.dtype == clip.dtype == torch.float32
    assert clip.device == torch.device("cpu") and clip.config.model_type == "clip_text_model"
    hidden, pooled = clip(ids, return_dict=False)
    torch.testing.assert_close(hidden, first)

    hf = make("t5")
    t5 = RBLNT5EncoderModel.from_model(hf, rbln_numerics="exact", **OPTIONS)
    ids, mask = batch()
    embeds = t5(ids, attention_mask=mask.bool()).last_hidden_state
    torch.testing.assert_close(embeds[mask.bool()], hf(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()],
                               atol=1e-5, rtol=1e-5)


def test_save_and_load_without_recompiling_with_the_tokenizer(tmp_path, monkeypatch):
    source = tmp_path / "bert"
    make("bert").save_pretrained(source)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(source)
    model = RBLNBertModel.from_pretrained(source, export=True, **OPTIONS)
    ids, mask = batch()
    before = model(ids, attention_mask=mask).last_hidden_state
    model.save_pretrained(tmp_path / "compiled")

    def refuse(*args, **kwargs):
        raise AssertionError("loading a compiled folder must not compile")

    monkeypatch.setattr(base, "compile_from_torch", refuse)
    loaded = RBLNBertModel.from_pretrained(tmp_path / "compiled")
    assert torch.equal(loaded(ids, attention_mask=mask).last_hidden_state, before)
    tokens = AutoTokenizer.from_pretrained(tmp_path / "compiled")("hello world", return_tensors="pt")
    assert loaded(**tokens).last_hidden_state.shape == (1, tokens["input_ids"].shape[1], 32)


def test_bad_inputs_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="rbln_max_seq_len is not set and T5EncoderModel has no max_position_embeddings"):
        RBLNT5EncoderModel.from_model(make("t5"), rbln_batch_size=2)
    with pytest.raises(ValueError, match="rbln_max_seq_len=99 is above the model's max_position_embeddings=16"):
        RBLNCLIPTextModel.from_model(make("clip"), rbln_max_seq_len=99)
    with pytest.raises(TypeError, match="rbln_max_seq_len must be an int"):
        RBLNCLIPTextModel.from_model(make("clip"), rbln_max_seq_len="16")
    model = RBLNBertModel.from_model(make("bert"), **OPTIONS)
    with pytest.raises(ValueError, match="17 tokens, more than rbln_max_seq_len=16"):
        model(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"outside this model's vocabulary \[0, 100\)"):
        model(torch.full((1, 4), 100))
    with pytest.raises(ValueError, match="attention_mask must be a tensor of the shape of input_ids"):
        model(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="rbln_output_hidden_states=True"):
        model(torch.ones(1, 4, dtype=torch.long), output_hidden_states=True)
    with pytest.raises(ValueError, match="RBLNBertModel compiles model_type bert.*'t5'.*RBLNT5EncoderModel"):
        RBLNBertModel.from_model(make("t5"), **OPTIONS)


def test_auto_classes_pick_the_encoder_from_the_architectures(tmp_path):
    from optimum_npu import RBLNAutoModel, RBLNAutoModelForTextEncoding

    make("clip").save_pretrained(tmp_path / "clip")
    make("clip_projection").save_pretrained(tmp_path / "clip_projection")
    make("t5").save_pretrained(tmp_path / "t5")
    # Same model_type (clip_text_model): the checkpoint's architectures tell the two apart.
    assert RBLNAutoModel.class_for(tmp_path / "clip", export=True) is RBLNCLIPTextModel
    assert RBLNAutoModel.class_for(tmp_path / "clip_projection", export=True) is RBLNCLIPTextModelWithProjection
    assert RBLNAutoModelForTextEncoding.class_for(tmp_path / "t5", export=True) is RBLNT5EncoderModel
    assert RBLNAutoModel.class_for(tmp_path / "t5", export=True, task="feature-extraction") is RBLNT5EncoderModel
    model = RBLNAutoModelForTextEncoding.from_pretrained(tmp_path / "t5", export=True, **OPTIONS)
    compiled = model.save_pretrained(tmp_path / "t5-rbln")
    assert type(RBLNAutoModel.from_pretrained(compiled, rbln_create_runtimes=False)) is RBLNT5EncoderModel
