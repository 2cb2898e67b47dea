"""Compiled models in transformers pipelines: preprocessors found in the model's folder, no
"is not supported" error logged for our classes, the pipeline's repr()."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, ResNetForImageClassification
from transformers import pipeline as transformers_pipeline
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

from optimum_npu import RBLNAutoModelForImageClassification, RBLNLlamaForCausalLM, pipeline
from optimum_npu.testing import build_tiny_image_classifier, build_tiny_random_llama


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    source = build_tiny_image_classifier(tmp_path_factory.mktemp("cls") / "resnet")
    model = RBLNAutoModelForImageClassification.from_pretrained(source, export=True, rbln_batch_size=2,
                                                                rbln_numerics="exact")
    folder = model.save_pretrained(source.parent / "compiled")
    model.close()
    return source, folder


def _not_supported(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is not supported" in r.getMessage()]


def test_image_classification_finds_the_image_processor_of_the_compiled_folder(classifier, caplog):
    source, folder = classifier
    image = Image.new("RGB", (40, 30), (200, 120, 30))
    hf = ResNetForImageClassification.from_pretrained(source).eval()
    with torch.no_grad():
        expected = hf(**ConvNextImageProcessorPil.from_pretrained(source)(images=image, return_tensors="pt")).logits
    expected = torch.softmax(expected, -1)[0]
    loaded = RBLNAutoModelForImageClassification.from_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        for model in (loaded, folder):   # a compiled model, or its folder
            classify = pipeline("image-classification", model=model)
            scores = {r["label"]: r["score"] for r in classify(image, top_k=3)}
            # exact numerics: the fp32 reference within float rounding
            assert scores == pytest.approx({hf.config.id2label[i]: float(p) for i, p in enumerate(expected)}, abs=1e-5)
            classify.model.close()
    assert _not_supported(caplog) == []
    assert "image" in repr(classify)


def test_transformers_pipeline_knows_our_classes_and_repr_works(tmp_path, caplog):
    source = build_tiny_random_llama(tmp_path / "llama", max_position_embeddings=128)
    model = RBLNLlamaForCausalLM.from_pretrained(source, export=True, rbln_max_seq_len=128)
    tokenizer = AutoTokenizer.from_pretrained(source)
    with caplog.at_level(logging.WARNING):
        generate = transformers_pipeline("text-generation", model=model, tokenizer=tokenizer)
        ours = pipeline("text-generation", model=model)   # the tokenizer from the checkpoint folder
    assert _not_supported(caplog) == []
    assert repr(generate) == ("TextGenerationPipeline: {'model': 'RBLNLlamaForCausalLM', 'dtype': 'float32', "
                              "'device': 'cpu', 'input_modalities': ('text',), 'output_modalities': ('text',)}")
    kwargs = dict(max_new_tokens=4, do_sample=False, return_full_text=False)
    assert ours("Once upon a time", **kwargs) == generate("Once upon a time", **kwargs)
    model.close()
