"""SDXL and the ControlNet pipelines (SD and SDXL) on the simulated NPU vs diffusers, same tiny components
and seed: diffusers' own __call__ on the compiled components, latents and float images compared."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline,
)

from optimum_npu import (
    RBLNControlNetModel, RBLNStableDiffusionControlNetPipeline, RBLNStableDiffusionPipeline,
    RBLNStableDiffusionXLControlNetPipeline, RBLNStableDiffusionXLPipeline,
)
from optimum_npu.testing.diffusers import (
    build_tiny_controlnet, build_tiny_stable_diffusion, build_tiny_stable_diffusion_xl,
)

from no_compiling import forbid_compiling

PROMPT = "a red cube on a mat"
# Exact numerics run the fp32 graphs diffusers runs; what differs is only the order of float sums
# in the CPU kernels (a batch padded to the compiled size, a graph's fused ops): measured up to 3e-5
# on latents up to ~30 in magnitude (1e-6 relative). A porting bug (a wrong residual, a time id
# dropped) moves latents by ~1.
LATENT_RTOL, LATENT_ATOL = 1e-5, 1e-4
PIXEL_ATOL = 1e-5   # float images in [0, 1], before any uint8 quantisation
# bf16 device numerics through 3 UNet steps and the VAE of random tiny weights: see test_diffusers_sd.py.
BF16_PIXEL_ATOL = 0.05


def _run(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


def _control_image(seed: int, side: int = 16) -> torch.Tensor:
    return torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed))


# ---- SDXL ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return build_tiny_stable_diffusion_xl(tmp_path_factory.mktemp("tiny-sdxl") / "sdxl")


@pytest.fixture(scope="module")
def compiled_sdxl(sdxl_folder):
    return RBLNStableDiffusionXLPipeline.from_pretrained(sdxl_folder, export=True, rbln_numerics="exact")


def test_sdxl_matches_diffusers(sdxl_folder, compiled_sdxl):
    """Both text encoders (the second's pooled projection is the added text embedding), the added time ids
    (given sizes and crop, not only the defaults) and a negative prompt through the compiled UNet."""
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe = compiled_sdxl
    assert pipe.rbln_config.guidance_scale == 5.0 and pipe.unet.rbln_config.batch_size == 2   # SDXL's default CFG
    assert pipe.unet.rbln_config.text_embeds_size == 32
    assert pipe.text_encoder.rbln_config.output_hidden_states and pipe.text_encoder_2.rbln_config.output_hidden_states
    np.testing.assert_allclose(_run(pipe, output_type="latent"), _run(reference, output_type="latent"),
                               rtol=LATENT_RTOL, atol=LATENT_ATOL)
    stats = pipe.generation_stats
    assert stats.components["text_encoder"].calls == stats.components["text_encoder_2"].calls == 1  # zeros: no negative
    assert stats.components["unet"].calls == 3 and "vae" not in stats.components   # latents: nothing decoded
    kwargs = {"negative_prompt": "a blue ball", "original_size": (32, 24), "crops_coords_top_left": (2, 4),
              "target_size": (16, 16), "output_type": "np"}
    images = _run(pipe, **kwargs)
    np.testing.assert_allclose(images, _run(reference, **kwargs), atol=PIXEL_ATOL, rtol=0)
    assert images.shape == (1, 16, 16, 3)
    assert pipe.generation_stats.components["text_encoder_2"].calls == 2   # prompt and negative prompt
    with pytest.raises(ValueError, match="turns classifier-free guidance off"):
        _run(pipe, guidance_scale=1.0)


def test_sdxl_saves_as_a_diffusers_folder_and_loads_without_recompiling(compiled_sdxl, tmp_path, monkeypatch):
    target = compiled_sdxl.save_pretrained(tmp_path / "compiled")
    index = json.loads((tmp_path / "compiled" / "model_index.json").read_text())
    assert index["_class_name"] == "RBLNStableDiffusionXLPipeline"
    assert index["text_encoder_2"][1] == "RBLNCLIPTextModelWithProjection" and index["tokenizer_2"][0] == "transformers"
    nested = json.loads((tmp_path / "compiled" / "rbln_config.json").read_text())["components"]
    assert nested["unet"]["compile_options"]["text_embeds_size"] == 32
    before = _run(compiled_sdxl, output_type="latent", num_inference_steps=2)
    forbid_compiling(monkeypatch)
    loaded = RBLNStableDiffusionXLPipeline.from_pretrained(target, rbln_config={"text_encoder_2": {"device": 1}})
    assert loaded.text_encoder_2.runtimes["model"].devices == [1]
    np.testing.assert_array_equal(_run(loaded, output_type="latent", num_inference_steps=2), before)
    with pytest.raises(ValueError, match="takes a compiled pipeline whose options are a"):
        RBLNStableDiffusionPipeline.from_pipe(loaded)   # SD and SDXL share no compiled UNet (nor text encoders)


def test_sdxl_unet_needs_the_text_embedding_width(sdxl_folder):
    from diffusers import UNet2DConditionModel

    from optimum_npu import RBLNUNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(f"{sdxl_folder}/unet")
    with pytest.raises(ValueError, match="rbln_text_embeds_size must be set for an SDXL"):
        RBLNUNet2DConditionModel.from_model(unet, rbln_max_seq_len=16)
    with pytest.raises(ValueError, match=r"rbln_text_embeds_size=30 does not fit the model's added embedding \(80"):
        RBLNUNet2DConditionModel.from_model(unet, rbln_max_seq_len=16, rbln_text_embeds_size=30)


@pytest.mark.heavy
def test_sdxl_in_device_numerics(sdxl_folder):
    reference = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe = RBLNStableDiffusionXLPipeline.from_pretrained(sdxl_folder, export=True)
    np.testing.assert_allclose(_run(pipe, output_type="np"), _run(reference, output_type="np"), atol=BF16_PIXEL_ATOL,
                               rtol=0)


# ---- ControlNet ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.fixture(scope="module")
def controlnet_folder(sd_folder, tmp_path_factory):
    return build_tiny_controlnet(tmp_path_factory.mktemp("tiny-controlnet") / "controlnet", f"{sd_folder}/unet")


@pytest.fixture(scope="module")
def compiled_controlnet_sd(sd_folder, controlnet_folder):
    return RBLNStableDiffusionControlNetPipeline.from_pretrained(
        sd_folder, controlnet=ControlNetModel.from_pretrained(controlnet_folder), export=True, rbln_numerics="exact")


def _controlnet_reference(sd_folder, controlnet_folder):
    return StableDiffusionControlNetPipeline.from_pretrained(
        sd_folder, controlnet=ControlNetModel.from_pretrained(controlnet_folder))


def test_controlnet_image_guides_the_image_as_in_diffusers(sd_folder, controlnet_folder, compiled_controlnet_sd):
    """Two control images give two different images, each diffusers' own."""
    reference = _controlnet_reference(sd_folder, controlnet_folder)
    pipe = compiled_controlnet_sd
    assert isinstance(pipe.controlnet, ControlNetModel) and isinstance(pipe.controlnet, RBLNControlNetModel)
    assert pipe.unet.rbln_config.uses_controlnet and pipe.controlnet.rbln_config.batch_size == 2
    results = []
    for seed in (1, 2):
        expected = _run(reference, image=_control_image(seed), output_type="latent", num_inference_steps=2)
        ours = _run(pipe, image=_control_image(seed), output_type="latent", num_inference_steps=2)
        np.testing.assert_allclose(ours, expected, rtol=LATENT_RTOL, atol=LATENT_ATOL)
        results.append(ours)
    # The control image guides the result: by far more than the comparison tolerance (measured 0.28).
    assert (results[0] - results[1]).abs().max() > 1000 * LATENT_ATOL
    assert pipe.generation_stats.components["controlnet"].calls == 3   # PNDM: one call more than the steps


@pytest.mark.heavy
def test_controlnet_scale_window_and_guess_mode_as_in_diffusers(sd_folder, controlnet_folder, compiled_controlnet_sd):
    """A conditioning scale applied from 40% of the steps on, guess mode (the ControlNet on the conditional
    half only, its residuals scaled 0.1 to 1), and the decoded float image."""
    reference = _controlnet_reference(sd_folder, controlnet_folder)
    for kwargs in ({"controlnet_conditioning_scale": 0.7, "control_guidance_start": 0.4, "output_type": "latent"},
                   {"guess_mode": True, "output_type": "latent"}, {"output_type": "np"}):
        np.testing.assert_allclose(_run(compiled_controlnet_sd, image=_control_image(1), **kwargs),
                                   _run(reference, image=_control_image(1), **kwargs),
                                   rtol=0 if kwargs["output_type"] == "np" else LATENT_RTOL,
                                   atol=PIXEL_ATOL if kwargs["output_type"] == "np" else LATENT_ATOL)


def test_controlnet_pipeline_generates_at_the_compiled_size(compiled_controlnet_sd):
    """Without height / width diffusers generates at the control image's size: another size is refused in pixels."""
    with pytest.raises(ValueError, match=r"height=32, width=32: this pipeline was compiled for 16x16 images"):
        _run(compiled_controlnet_sd, image=_control_image(1, side=32))


def test_controlnet_pipeline_round_trip(compiled_controlnet_sd, tmp_path, monkeypatch):
    target = compiled_controlnet_sd.save_pretrained(tmp_path / "compiled")
    index = json.loads((tmp_path / "compiled" / "model_index.json").read_text())
    assert index["controlnet"][1] == "RBLNControlNetModel" and index["unet"][1] == "RBLNUNet2DConditionModel"
    before = _run(compiled_controlnet_sd, image=_control_image(1), output_type="latent", num_inference_steps=2)
    forbid_compiling(monkeypatch)
    loaded = RBLNStableDiffusionControlNetPipeline.from_pretrained(target)
    np.testing.assert_array_equal(_run(loaded, image=_control_image(1), output_type="latent", num_inference_steps=2),
                                  before)


def test_controlnet_export_takes_a_diffusers_controlnet_only(sd_folder, compiled_controlnet_sd):
    with pytest.raises(ValueError, match="lacks the component"):
        RBLNStableDiffusionControlNetPipeline.from_pretrained(sd_folder, export=True)   # no controlnet in the folder
    with pytest.raises(ValueError, match="controlnet= at export must be a ControlNetModel to compile"):
        RBLNStableDiffusionControlNetPipeline.from_pretrained(sd_folder, export=True,
                                                              controlnet=compiled_controlnet_sd.controlnet)


@pytest.mark.heavy
def test_sdxl_controlnet_matches_diffusers(sdxl_folder, tmp_path):
    """SDXL's ControlNet takes the added text / time conditions too."""
    controlnet = build_tiny_controlnet(tmp_path / "controlnet", f"{sdxl_folder}/unet")
    reference = StableDiffusionXLControlNetPipeline.from_pretrained(
        sdxl_folder, controlnet=ControlNetModel.from_pretrained(controlnet))
    pipe = RBLNStableDiffusionXLControlNetPipeline.from_pretrained(
        sdxl_folder, controlnet=ControlNetModel.from_pretrained(controlnet), export=True, rbln_numerics="exact")
    assert pipe.controlnet.rbln_config.text_embeds_size == 32
    results = []
    for seed in (1, 2):
        expected = _run(reference, image=_control_image(seed), output_type="latent")
        ours = _run(pipe, image=_control_image(seed), output_type="latent")
        np.testing.assert_allclose(ours, expected, rtol=LATENT_RTOL, atol=LATENT_ATOL)
        results.append(ours)
    assert (results[0] - results[1]).abs().max() > 1000 * LATENT_ATOL
    kwargs = {"guess_mode": True, "controlnet_conditioning_scale": 0.5}
    np.testing.assert_allclose(_run(pipe, image=_control_image(1), output_type="latent", **kwargs),
                               _run(reference, image=_control_image(1), output_type="latent", **kwargs),
                               rtol=LATENT_RTOL, atol=LATENT_ATOL)
    target = pipe.save_pretrained(tmp_path / "compiled")
    loaded = RBLNStableDiffusionXLControlNetPipeline.from_pretrained(target)
    np.testing.assert_array_equal(_run(loaded, image=_control_image(1), output_type="latent"), results[0])
