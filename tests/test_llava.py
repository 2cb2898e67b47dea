"""A vision-language model end to end: RBLNLlavaForConditionalGeneration against transformers'
LlavaForConditionalGeneration on a tiny random checkpoint (CLIP vision tower + projector + Llama),
in exact numerics: the same greedy tokens and first-step logits; save / load without recompiling;
the auto classes; the processor in the compiled folder; the nested options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from optimum_npu import RBLNAutoModel, RBLNAutoModelForImageTextToText, RBLNLlavaForConditionalGeneration
from optimum_npu.testing import build_tiny_llava

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="module")
def compiled(source):
    model = RBLNLlavaForConditionalGeneration.from_pretrained(
        source, export=True, rbln_numerics="exact", rbln_batch_size=2,
        rbln_config={"language_model": {"max_seq_len": 128}, "vision_tower": {"batch_size": 1}})
    yield model
    model.close()


def _inputs(source):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(source)
    processor.tokenizer.padding_side = "left"
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(20, 24, 3) * 255).astype("uint8")) for _ in range(2)]
    texts = [[{"type": "image"}, {"type": "text", "text": "What is this?"}],
             [{"type": "text", "text": "Tell a story about"}, {"type": "image"}]]
    prompts = [processor.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)
               for t in texts]
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def test_generate_with_images_matches_transformers(source, compiled):
    from transformers import LlavaForConditionalGeneration

    inputs = _inputs(source)
    assert inputs["attention_mask"][1].all() and not inputs["attention_mask"][0].all()  # left padding in the batch
    reference = LlavaForConditionalGeneration.from_pretrained(source).eval()
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = reference.generate(**inputs, **settings)
    got = compiled.generate(**inputs, **settings)
    assert torch.equal(got.sequences, want.sequences)
    assert len(set(want.sequences[:, -NEW_TOKENS:].flatten().tolist())) > 2   # not one token over and over
    torch.testing.assert_close(got.logits[0], want.logits[0], rtol=1e-4, atol=1e-4)
    # the images matter: other pixels give other first-step logits, in both
    other = {**inputs, "pixel_values": inputs["pixel_values"].flip(-1)}
    with torch.no_grad():
        want_other = reference.generate(**other, **settings)
    got_other = compiled.generate(**other, **settings)
    torch.testing.assert_close(got_other.logits[0], want_other.logits[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want_other.logits[0], want.logits[0], atol=1e-3)
    assert compiled.inference_stats.samples == 2 and compiled.generation_stats.ttft_s > 0


def test_save_and_load_without_recompiling(source, compiled, tmp_path, monkeypatch):
    from transformers import AutoProcessor, LlavaProcessor

    folder = compiled.save_pretrained(tmp_path / "compiled")
    data = json.loads((tmp_path / "compiled" / "rbln_config.json").read_text())
    assert set(data["components"]) == {"vision_tower", "language_model"}
    assert data["components"]["language_model"]["compile_options"]["use_inputs_embeds"] is True
    assert data["components"]["vision_tower"]["compile_options"]["numerics"] == "exact"

    import optimum_npu.compile.compiler as compiler

    def no_compiling(*args, **kwargs):
        raise AssertionError("a compiled folder must load without compiling")

    monkeypatch.setattr(compiler, "compile_from_torch", no_compiling)
    monkeypatch.setattr("optimum_npu.modeling.base.compile_from_torch", no_compiling)
    loaded = RBLNAutoModel.from_pretrained(folder, rbln_config={"language_model": {"device": 1}})
    assert type(loaded) is RBLNLlavaForConditionalGeneration
    assert loaded.language_model.runtimes["prefill"].devices == [1]
    inputs = _inputs(source)
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False),
                       compiled.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False))
    assert isinstance(AutoProcessor.from_pretrained(folder), LlavaProcessor)   # the processor travels with it
    loaded.close()
    with pytest.raises(ValueError, match=r"rbln_config\['language_model'\]: rbln_max_seq_len is fixed at compile time"):
        RBLNAutoModel.from_pretrained(folder, rbln_config={"language_model": {"max_seq_len": 64}})


def test_the_image_text_to_text_pipeline(source, compiled):
    """transformers' pipeline, the processor from the model's folder: its answer is the greedy tokens'."""
    from optimum_npu import pipeline

    pipe = pipeline("image-text-to-text", model=compiled)
    image = Image.fromarray((np.random.RandomState(1).rand(16, 16, 3) * 255).astype("uint8"))
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]
    answer = pipe(text=chat, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"][-1]
    inputs = pipe.processor(images=image, text=pipe.processor.apply_chat_template(chat, add_generation_prompt=True),
                            return_tensors="pt")
    tokens = compiled.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert answer == {"role": "assistant", "content": pipe.processor.decode(tokens, skip_special_tokens=True)}


def test_a_folder_whose_parts_do_not_belong_together_is_refused(compiled, tmp_path):
    """rbln_config.json nests the language model's options; its language_model/ compiled with others (the
    folder edited or mixed) does not load, nor does one whose language_model/ lost a file."""
    import shutil

    folder = tmp_path / "compiled"
    compiled.save_pretrained(folder)
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    data = json.loads((mixed / "rbln_config.json").read_text())
    data["components"]["language_model"]["compile_options"]["dtype"] = "float16"
    (mixed / "rbln_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="disagree on language_model's compile options"):
        RBLNAutoModel.from_pretrained(mixed, rbln_create_runtimes=False)
    (folder / "language_model" / "decoder_batch_2.rbln").unlink()
    with pytest.raises(ValueError, match="language_model/decoder_batch_2.rbln is missing"):
        RBLNAutoModel.from_pretrained(folder, rbln_create_runtimes=False)


def test_the_auto_classes_pick_it_from_model_type(source):
    assert RBLNAutoModelForImageTextToText.class_for(source, export=True) is RBLNLlavaForConditionalGeneration
    assert RBLNAutoModel.class_for(source, export=True) is RBLNLlavaForConditionalGeneration


@pytest.mark.parametrize("options, message", [
    ({"rbln_config": {"languag_model": {}}}, r"Did you mean language_model\?"),
    ({"rbln_language_model": {"max_seq_lenn": 64}}, r"rbln_config\['language_model'\] for "
                                                    r"RBLNDecoderOnlyModelForCausalLMConfig\. Did you mean max_seq_len\?"),
    ({"rbln_config": {"language_model": {"use_inputs_embeds": False}}}, "use_inputs_embeds'] must be True"),
    ({"rbln_tensor_parallel_size": 2}, r"rbln_tensor_parallel_size is the language model's"),
])
def test_bad_options_are_refused_before_loading_weights(source, options, message):
    with pytest.raises(ValueError, match=message):
        RBLNLlavaForConditionalGeneration.from_pretrained(source, export=True, **options)


def test_image_tokens_and_images_must_agree(source, compiled):
    inputs = _inputs(source)
    with pytest.raises(ValueError, match="image token.*but no pixel_values"):
        compiled.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=2)
    with pytest.raises(ValueError, match="2 image\\(s\\) of .* patches each need as many"):
        compiled.generate(input_ids=inputs["input_ids"][:1], attention_mask=inputs["attention_mask"][:1],
                          pixel_values=inputs["pixel_values"], max_new_tokens=2)
    with pytest.raises(ValueError, match="pixel_values must be a float tensor"):
        compiled.generate(**{**inputs, "pixel_values": inputs["pixel_values"][:, :, :8]}, max_new_tokens=2)


@pytest.mark.heavy  # another tiny checkpoint and its compile: ~40 s on a busy 2-core machine
def test_a_siglip_tower_two_feature_layers_and_a_qwen2_text_model(tmp_path):
    """The other vision tower LLaVA-style models use (SigLIP: no CLS row, the "full" strategy), features of two
    layers concatenated, and another decoder family for the text: the same greedy tokens as transformers."""
    from transformers import LlavaForConditionalGeneration

    source = build_tiny_llava(tmp_path / "siglip-qwen2", vision_model_type="siglip_vision_model",
                              text_model_type="qwen2", vision_feature_layer=[-2, -1],
                              vision_feature_select_strategy="full")
    model = RBLNAutoModelForImageTextToText.from_pretrained(source, export=True, rbln_numerics="exact",
                                                            rbln_batch_size=2, rbln_language_model={"max_seq_len": 128})
    assert type(model.language_model).__name__ == "RBLNQwen2ForCausalLM"
    inputs = _inputs(source)
    reference = LlavaForConditionalGeneration.from_pretrained(source).eval()
    with torch.no_grad():
        want = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False), want)
    model.close()


@pytest.mark.heavy  # a second compile of the tiny checkpoint, in bf16
def test_device_numerics_first_step_logits_within_tolerance(source):
    """bf16 on the device: the first-step logits of each prompt (image features included) against fp32
    transformers, within the decoders' bf16 bound (tests/test_llm_parity.py: 10% of max |logit|, mean
    error a quarter of that, the same top-1 where transformers' margin is clear)."""
    from transformers import LlavaForConditionalGeneration

    rtol = 0.10
    model = RBLNLlavaForConditionalGeneration.from_pretrained(source, export=True, rbln_batch_size=2,
                                                              rbln_language_model={"max_seq_len": 128})
    inputs = _inputs(source)
    settings = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
    reference = LlavaForConditionalGeneration.from_pretrained(source).eval()
    with torch.no_grad():
        expected = reference.generate(**inputs, **settings).logits[0]
    logits = model.generate(**inputs, **settings).logits[0]
    model.close()
    scale = expected.abs().amax(dim=-1, keepdim=True)
    error = (logits - expected).abs() / scale
    assert error.max() <= rtol and error.mean(dim=-1).max() <= 0.25 * rtol
    top2 = expected.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5 * rtol * scale[:, 0]
    assert (logits.argmax(-1) == expected.argmax(-1))[clear].all()
