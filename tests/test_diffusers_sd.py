"""Stable Diffusion pipelines on the simulated NPU vs diffusers on the same tiny components and seed."""

import json

import numpy as np
import pytest
import torch
from diffusers import ConfigMixin, ModelMixin, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from optimum_npu.diffusers.pipelines.stable_diffusion import (
    RBLNStableDiffusionImg2ImgPipeline, RBLNStableDiffusionPipeline,
)
from optimum_npu.testing import build_tiny_stable_diffusion

PROMPT = "a red cube on a mat"
# bf16 device numerics through 3 UNet steps and the VAE of random tiny weights: pixels in [0, 1]
# move by ~1e-2 at most (measured 0.017); a porting bug moves them by ~1.
BF16_PIXEL_ATOL = 0.05


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.fixture(scope="module")
def compiled_sd(sd_folder):
    """The pipeline compiled once in device numerics (bf16), shared by the tests that only run it."""
    return RBLNStableDiffusionPipeline.from_pretrained(sd_folder, export=True)


def _images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="np").images


@pytest.mark.parametrize("numerics, atol", [("exact", 1e-5), ("device", BF16_PIXEL_ATOL)])
def test_text_to_image_matches_diffusers(sd_folder, compiled_sd, numerics, atol):
    reference = _images(StableDiffusionPipeline.from_pretrained(sd_folder), prompt=PROMPT, num_inference_steps=3)
    pipe = compiled_sd if numerics == "device" else RBLNStableDiffusionPipeline.from_pretrained(
        sd_folder, export=True, rbln_numerics=numerics)
    ours = _images(pipe, prompt=PROMPT, num_inference_steps=3)
    assert ours.shape == reference.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(ours, reference, atol=atol, rtol=0)
    stats = pipe.generation_stats
    assert stats.denoising_steps == 4  # PNDM without PRK steps adds one
    assert stats.components["unet"].calls == 4 and stats.components["text_encoder"].calls == 2  # prompt, negative
    assert stats.components["vae"].calls == 1 and stats.device_s > stats.components["unet"].device_s > 0
    assert "(4 unet call(s))" in str(stats) and "steps" not in str(stats)   # 3 inference steps, 4 UNet calls


def test_guidance_stays_on_or_off_as_compiled(sd_folder, compiled_sd):
    """Any guidance_scale > 1 runs a pipeline compiled with guidance (its UNet batch doubled); turning
    guidance off (or on, for one compiled without it) is a ValueError naming what to recompile with."""
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, guidance_scale=3.0)
    reference = StableDiffusionPipeline.from_pretrained(sd_folder)
    assert compiled_sd.rbln_config.guidance_scale == 7.5 and compiled_sd.unet.rbln_config.batch_size == 2
    np.testing.assert_allclose(_images(compiled_sd, **kwargs), _images(reference, **kwargs), atol=BF16_PIXEL_ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"guidance_scale=1.0 turns classifier-free guidance off .* compiled with "
                                         r"rbln_guidance_scale=7.5.* rbln_guidance_scale=1.0"):
        _images(compiled_sd, **{**kwargs, "guidance_scale": 1.0})
    with pytest.raises(ValueError, match="guidance_scale=0.5"):  # given positionally, as diffusers allows
        compiled_sd(PROMPT, None, None, 2, None, None, 0.5)

    unguided = RBLNStableDiffusionPipeline.from_pretrained(sd_folder, export=True, rbln_guidance_scale=1.0,
                                                           rbln_numerics="exact")
    assert unguided.unet.rbln_config.batch_size == 1
    kwargs["guidance_scale"] = 1.0
    np.testing.assert_allclose(_images(unguided, **kwargs), _images(reference, **kwargs), atol=1e-5, rtol=0)
    assert unguided.generation_stats.components["unet"].calls == 3  # one unpadded run per step
    with pytest.raises(ValueError, match=r"turns classifier-free guidance on .* rbln_guidance_scale=7.5"):
        _images(unguided, prompt=PROMPT, num_inference_steps=2)  # diffusers' default guidance_scale, 7.5


def test_another_image_size_is_refused_in_pixels(compiled_sd):
    with pytest.raises(ValueError, match=r"height=32, width=32: this pipeline was compiled for 16x16 images.*"
                                         r"height=16, width=16.*rbln_config=\{'height': 32, 'width': 32\}"):
        compiled_sd(PROMPT, height=32, width=32, num_inference_steps=2)
    with pytest.raises(ValueError, match="height=16, width=24"):
        compiled_sd(PROMPT, width=24, num_inference_steps=2)


def test_image_to_image_matches_diffusers(sd_folder):
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt=PROMPT, image=image, strength=0.7, num_inference_steps=4)
    reference = _images(StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder), **kwargs)
    pipe = RBLNStableDiffusionImg2ImgPipeline.from_pretrained(sd_folder, export=True, rbln_numerics="exact")
    np.testing.assert_allclose(_images(pipe, **kwargs), reference, atol=1e-5, rtol=0)
    assert pipe.generation_stats.components["vae"].calls == 2  # encode the image, decode the result


def _public(config):
    return json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))


def test_compiled_components_are_the_diffusers_models_the_pipeline_methods_walk(sd_folder, compiled_sd):
    """diffusers' pipeline methods that go through the torch components (to, device, dtype, components,
    from_pipe) find the compiled UNet and VAE as the ModelMixin / ConfigMixin models they replace."""
    pipe, reference = compiled_sd, StableDiffusionPipeline.from_pretrained(sd_folder)
    for name in ("unet", "vae"):
        ours, theirs = getattr(pipe, name), getattr(reference, name)
        assert isinstance(ours, ModelMixin) and isinstance(ours, ConfigMixin)
        assert (ours.device, ours.dtype) == (theirs.device, theirs.dtype)
        assert _public(ours.config) == _public(theirs.config)
    assert (pipe.device, pipe.dtype, pipe._execution_device) == (
        reference.device, reference.dtype, reference._execution_device)
    assert sorted(pipe.components) == sorted(reference.components)
    before = _images(pipe, prompt=PROMPT, num_inference_steps=2)
    assert pipe.to("cpu") is pipe and pipe.to(torch.float32) is pipe and pipe.to("cpu", torch.float32) is pipe
    np.testing.assert_array_equal(_images(pipe, prompt=PROMPT, num_inference_steps=2), before)
    with pytest.raises(ValueError, match="choose its NPU with rbln_device"):
        pipe.to("cuda")
    with pytest.raises(ValueError, match="rbln_dtype='bfloat16'"):
        pipe.to(torch.float16)
    with pytest.raises(ValueError, match="none on the host to offload"):
        pipe.enable_model_cpu_offload()
    shared = RBLNStableDiffusionPipeline.from_pipe(pipe)  # the same compiled components, not copies
    assert shared.unet is pipe.unet and shared.vae is pipe.vae and shared.text_encoder is pipe.text_encoder
    assert shared.rbln_config == pipe.rbln_config
    np.testing.assert_array_equal(_images(shared, prompt=PROMPT, num_inference_steps=2), before)
    with pytest.raises(ValueError, match=r"VAE encoder.*rbln_config=\{'vae': \{'uses_encoder': True\}\}"):
        RBLNStableDiffusionImg2ImgPipeline.from_pipe(pipe)  # its VAE has no compiled encoder


def test_image_to_image_from_a_text_to_image_pipeline_compiled_with_the_encoder(sd_folder):
    """The usual diffusers pattern: from_pipe shares the compiled components, the VAE encoder included
    when the text-to-image export was asked for it."""
    text_to_image = RBLNStableDiffusionPipeline.from_pretrained(
        sd_folder, export=True, rbln_numerics="exact", rbln_config={"vae": {"uses_encoder": True}})
    pipe = RBLNStableDiffusionImg2ImgPipeline.from_pipe(text_to_image)
    assert pipe.vae is text_to_image.vae and pipe.unet is text_to_image.unet
    assert type(pipe.rbln_config).__name__ == "RBLNStableDiffusionImg2ImgPipelineConfig"
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    kwargs = dict(prompt=PROMPT, image=image, strength=0.7, num_inference_steps=4)
    reference = _images(StableDiffusionImg2ImgPipeline.from_pretrained(sd_folder), **kwargs)
    np.testing.assert_allclose(_images(pipe, **kwargs), reference, atol=1e-5, rtol=0)


def test_save_load_round_trip(sd_folder, compiled_sd, tmp_path):
    pipe = compiled_sd
    before = _images(pipe, prompt=PROMPT, num_inference_steps=2)
    target = pipe.save_pretrained(tmp_path / "compiled")
    index = json.loads((tmp_path / "compiled" / "model_index.json").read_text())
    assert index["_class_name"] == "RBLNStableDiffusionPipeline"
    assert index["unet"][1] == "RBLNUNet2DConditionModel" and index["vae"][1] == "RBLNAutoencoderKL"
    assert index["text_encoder"][1] == "RBLNCLIPTextModel"
    for name in ("unet", "vae", "text_encoder"):
        assert {"config.json", "rbln_config.json"} <= {p.name for p in (tmp_path / "compiled" / name).iterdir()}
    loaded = RBLNStableDiffusionPipeline.from_pretrained(target, rbln_config={"unet": {"device": 1}})
    assert isinstance(loaded.unet, ModelMixin) and isinstance(loaded.vae, ModelMixin)
    assert _public(loaded.unet.config) == _public(pipe.unet.config)
    assert loaded.unet.runtimes["model"].devices == [1]
    np.testing.assert_array_equal(_images(loaded, prompt=PROMPT, num_inference_steps=2), before)
    with pytest.raises(ValueError, match="rbln_height is fixed at compile time"):
        RBLNStableDiffusionPipeline.from_pretrained(target, rbln_height=32)
    with pytest.raises(ValueError, match="rbln_batch_size is fixed at compile time"):
        RBLNStableDiffusionPipeline.from_pretrained(target, rbln_config={"unet": {"batch_size": 1}})
    with pytest.raises(ValueError, match="not a compiled pipeline folder"):
        pipe.save_pretrained(sd_folder)  # the source checkpoint is never overwritten
    pipe.save_pretrained(target)  # saving over our own compiled folder updates it in place
    assert RBLNStableDiffusionPipeline.from_pretrained(target, rbln_create_runtimes=False).unet.runtimes == {}


def test_stable_diffusion_safety_checker_runs_on_the_host_as_in_diffusers(tmp_path):
    """The checkpoint's own safety checker (CLIP vision + concept embeddings) and feature extractor stay
    torch modules on the host: diffusers' __call__ runs them on the compiled pipeline's images, and the
    pipeline saves and loads them with the compiled components."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    folder = build_tiny_stable_diffusion(tmp_path / "sd", safety_checker=True)
    reference = StableDiffusionPipeline.from_pretrained(folder)
    pipe = RBLNStableDiffusionPipeline.from_pretrained(folder, export=True, rbln_numerics="exact")
    assert isinstance(pipe.safety_checker, StableDiffusionSafetyChecker) and pipe.feature_extractor is not None

    def generate(p):
        p.set_progress_bar_config(disable=True)
        out = p(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
        return out.images, out.nsfw_content_detected

    for threshold, flagged in ((0.0, True), (1.0, False)):  # every image flagged (black), none flagged
        with torch.no_grad():
            for p in (reference, pipe):
                p.safety_checker.concept_embeds_weights.fill_(threshold)
        expected_images, expected_nsfw = generate(reference)
        assert expected_nsfw == [flagged]  # the tiny checker does what its thresholds say
        images, nsfw = generate(pipe)
        assert nsfw == expected_nsfw
        np.testing.assert_allclose(images, expected_images, atol=1e-5, rtol=0)
        assert (images.max() == 0) == flagged

    with pytest.raises(ValueError, match="rbln_dtype"):
        pipe.to(torch.float16)
    assert pipe.safety_checker.dtype == torch.float32  # refused before diffusers cast any host component

    target = pipe.save_pretrained(tmp_path / "compiled")  # with the "none flagged" thresholds
    index = json.loads((tmp_path / "compiled" / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert index["requires_safety_checker"] is True and index["feature_extractor"][0] == "transformers"
    loaded = RBLNStableDiffusionPipeline.from_pretrained(target)
    assert isinstance(loaded.safety_checker, StableDiffusionSafetyChecker)
    loaded_images, loaded_nsfw = generate(loaded)
    assert loaded_nsfw == [False]
    np.testing.assert_array_equal(loaded_images, images)


def test_export_refuses_a_checkpoint_folder_given_as_compiled(sd_folder):
    with pytest.raises(ValueError, match="export=True"):
        RBLNStableDiffusionPipeline.from_pretrained(sd_folder)


@pytest.mark.parametrize("entry, message", [
    (["os", "system"], "library 'os'"),                              # only diffusers / transformers host parts
    (["diffusers", "load_image"], "not a loadable class"),            # a function, not a class
])
def test_model_index_is_data_not_code(sd_folder, tmp_path, entry, message):
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = entry
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=message):
        RBLNStableDiffusionPipeline.from_pretrained(folder, export=True)


def test_a_component_of_another_class_is_refused(sd_folder, tmp_path):
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="compiles a UNet2DConditionModel there"):
        RBLNStableDiffusionPipeline.from_pretrained(folder, export=True)


def test_clip_skip_matches_diffusers(sd_folder, compiled_sd, tmp_path):
    """clip_skip runs diffusers' encode_prompt unchanged: the hidden states of an earlier CLIP layer
    through the compiled final norm (`text_encoder.text_model.final_layer_norm`, which diffusers
    calls); the option survives save / load."""
    reference_pipe = StableDiffusionPipeline.from_pretrained(sd_folder)
    # The reference computes the skipped prompt embeddings itself: diffusers' own clip_skip path
    # reaches `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has.
    encoder, tokenizer = reference_pipe.text_encoder, reference_pipe.tokenizer
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = encoder(ids, output_hidden_states=True).hidden_states[-2]  # clip_skip=1: one layer before the last
        prompt_embeds = encoder.final_layer_norm(hidden)
    reference = _images(reference_pipe, prompt_embeds=prompt_embeds, num_inference_steps=2)
    unskipped = _images(reference_pipe, prompt=PROMPT, num_inference_steps=2)
    assert np.abs(reference - unskipped).max() > 1e-3  # skipping a layer changes the image: the test can tell

    kwargs = dict(prompt=PROMPT, num_inference_steps=2, clip_skip=1)
    pipe = RBLNStableDiffusionPipeline.from_pretrained(
        sd_folder, export=True, rbln_numerics="exact", rbln_config={"text_encoder": {"output_hidden_states": True}})
    np.testing.assert_allclose(_images(pipe, **kwargs), reference, atol=1e-5, rtol=0)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = RBLNStableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    np.testing.assert_allclose(_images(loaded, **kwargs), reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="output_hidden_states"):
        _images(compiled_sd, **kwargs)  # compiled without the hidden states clip_skip needs
