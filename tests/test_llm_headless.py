"""Headless decoders against the fp32 transformers models they were compiled from: an embedding
model (RBLNQwen3Model: transformers' last_hidden_state, last-token and mean pooling) and a
sequence classifier (RBLNQwen3ForSequenceClassification, a reranker's relevance head: the last
token's scores), on a left-padded batch whose longer row spans two prefill chunks.

Tolerances: exact numerics do the same fp32 math as transformers in another order (paged KV,
per-chunk attention): hidden states (RMS-normalised, |x| ~ 1) and scores within 1e-4 absolute
(test_llm_parity.py's EXACT_LOGITS_ATOL). Device numerics (bf16, heavy tier): within 10% of the
largest |value| of each row (test_llm_parity.py's BF16_LOGITS_RTOL, its measured basis).
"""

import pytest
import torch
from transformers import Qwen3ForSequenceClassification, Qwen3Model

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import hf_config, left_pad, random_prompts
from optimum_npu import RBLNAutoModel, RBLNQwen3ForSequenceClassification, RBLNQwen3Model
from optimum_npu.modeling import base
from optimum_npu.modeling.decoderonly.modeling_headless import pool
from test_llm_parity import BF16_LOGITS_RTOL, EXACT_LOGITS_ATOL

OPTIONS = dict(rbln_batch_size=2, rbln_max_seq_len=256, rbln_prefill_chunk_size=64)
NUM_LABELS = 3


def make(cls, **overrides):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(hf_config("qwen3", **overrides)).float().eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (HF checkpoint folder, fp32 HF model)."""
    found = {}
    for kind, model in {"embedding": make(Qwen3Model),
                        "classifier": make(Qwen3ForSequenceClassification, num_labels=NUM_LABELS)}.items():
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        found[kind] = (folder, model)
    return found


def batch():
    return left_pad(random_prompts((70, 9), seed=1))  # 70 tokens: two prefill chunks of 64


def compiled_from(folder, **options):
    return RBLNAutoModel.from_pretrained(folder, export=True, **{**OPTIONS, **options})


def test_embedding_model_gives_transformers_hidden_states_and_pools_them(checkpoints, tmp_path, monkeypatch):
    folder, hf = checkpoints["embedding"]
    ids, mask = batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    model = compiled_from(folder, rbln_numerics="exact")
    try:
        assert type(model) is RBLNQwen3Model  # the auto class, from the checkpoint's architectures
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert hidden.shape == expected.shape
        real = mask.bool()
        assert (hidden - expected)[real].abs().max() <= EXACT_LOGITS_ATOL
        assert (hidden[~real] == 0).all()
        for pooling in ("last_token", "mean"):
            pooled = model.encode(input_ids=ids, attention_mask=mask, pooling=pooling)
            assert (pooled - pool(expected, mask, pooling)).abs().max() <= EXACT_LOGITS_ATOL, pooling
        # last-token pooling is the last real token's state: the last column with left padding
        assert torch.equal(pool(expected, mask, "last_token"), expected[:, -1])
        unit = model.encode(input_ids=ids, attention_mask=mask, normalize=True)
        assert torch.allclose(unit.norm(dim=-1), torch.ones(2))
        with pytest.raises(ValueError, match="pooling must be one of"):
            model.encode(input_ids=ids, attention_mask=mask, pooling="cls")
        model.save_pretrained(tmp_path / "compiled")
    finally:
        model.close()
    check_loads_without_compiling(tmp_path / "compiled", RBLNQwen3Model, lambda m: m(input_ids=ids, attention_mask=mask)
                                  .last_hidden_state, hidden, monkeypatch)


def test_sequence_classifier_gives_transformers_scores(checkpoints, tmp_path, monkeypatch):
    folder, hf = checkpoints["classifier"]
    ids, mask = batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits  # the last non-padding token's scores
    model = compiled_from(folder, rbln_numerics="exact")
    try:
        assert type(model) is RBLNQwen3ForSequenceClassification
        logits = model(input_ids=ids, attention_mask=mask).logits
        assert logits.shape == (2, NUM_LABELS)
        assert (logits - expected).abs().max() <= EXACT_LOGITS_ATOL
        model.save_pretrained(tmp_path / "compiled")
    finally:
        model.close()
    check_loads_without_compiling(tmp_path / "compiled", RBLNQwen3ForSequenceClassification,
                                  lambda m: m(input_ids=ids, attention_mask=mask).logits, logits, monkeypatch)


def check_loads_without_compiling(folder, cls, output, expected, monkeypatch):
    """The saved folder loads through the auto class as `cls`, with only its prefill graph, compiling
    nothing, and `output(model)` equals `expected`."""
    monkeypatch.setattr(base, "compile_from_torch", lambda *a, **k: pytest.fail("compiled while loading"))
    loaded = RBLNAutoModel.from_pretrained(folder)
    try:
        assert type(loaded) is cls and loaded.graphs.keys() == {"prefill"}
        assert torch.equal(output(loaded), expected)
    finally:
        loaded.close()


def test_headless_models_refuse_decode_options(checkpoints):
    folder, _ = checkpoints["embedding"]
    with pytest.raises(ValueError, match="decoder_batch_sizes: a headless decoder compiles no decode graphs"):
        compiled_from(folder, rbln_decoder_batch_sizes=[2], rbln_create_runtimes=False)


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["embedding", "classifier"])
def test_device_numerics_within_bf16_tolerance(checkpoints, kind):
    folder, hf = checkpoints[kind]
    ids, mask = batch()
    model = compiled_from(folder, rbln_dtype="bfloat16")
    try:
        with torch.no_grad():
            if kind == "embedding":
                got = model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
                expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
            else:
                got = model(input_ids=ids, attention_mask=mask).logits
                expected = hf(input_ids=ids, attention_mask=mask).logits
    finally:
        model.close()
    scale = expected.abs().amax(dim=-1, keepdim=True)
    worst = ((got - expected).abs() / scale).max().item()
    assert worst <= BF16_LOGITS_RTOL, f"{kind}: max error {worst:.3g} x max|value| > {BF16_LOGITS_RTOL}"
