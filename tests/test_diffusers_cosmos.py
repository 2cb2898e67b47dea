"""Cosmos text-to-world and video-to-world on the simulated NPU vs diffusers on the same tiny
components and seed, and the safety checker they require."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import CosmosTextToWorldPipeline, CosmosVideoToWorldPipeline, ModelMixin

from optimum_npu.diffusers.pipelines.cosmos import RBLNCosmosTextToWorldPipeline, RBLNCosmosVideoToWorldPipeline
from optimum_npu.testing import build_tiny_cosmos

from cosmos_reference import reference_resize_without_torchvision  # noqa: F401  (an autouse fixture)
from quantised import assert_pixels_within_one_step

SHAPE = {"height": 16, "width": 16, "num_frames": 9, "max_seq_len": 16}
CALL = dict(prompt="a robot arm lifts a red cube", height=16, width=16, num_frames=9, fps=24, max_sequence_length=16,
            num_inference_steps=3, output_type="np")
# bf16 device numerics through 3 EDM steps (2 transformer calls each) and the video VAE of random
# tiny weights: pixels in [0, 1] move by ~1e-2 at most (measured 0.016); a porting bug moves them by ~1.
BF16_PIXEL_ATOL = 0.05


class PassingChecker:
    """A stand-in guardrail that refuses prompts with a blocklisted word and passes every video."""

    def check_text_safety(self, prompt):
        return "zorblax" not in prompt

    def check_video_safety(self, frames):
        return frames

    def to(self, *args, **kwargs):
        return self


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-cosmos")
    return build_tiny_cosmos(root / "t2w"), build_tiny_cosmos(root / "v2w", video_to_world=True)


def _frames(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**{**CALL, **kwargs}, generator=torch.Generator().manual_seed(0)).frames


def assert_same_video(ours_pipe, reference_pipe, **kwargs) -> None:
    """Exact numerics: the denoised latents (floats) agree to 1e-5; the frames, quantised to uint8
    around the safety checker, within one uint8 step (tests/quantised.py says why)."""
    torch.testing.assert_close(_frames(ours_pipe, output_type="latent", **kwargs),
                               _frames(reference_pipe, output_type="latent", **kwargs), atol=1e-5, rtol=0)
    assert_pixels_within_one_step(_frames(ours_pipe, **kwargs), _frames(reference_pipe, **kwargs))


def test_text_to_world_matches_diffusers_exactly(folders):
    checker = PassingChecker()
    reference_pipe = CosmosTextToWorldPipeline.from_pretrained(folders[0], safety_checker=checker)
    pipe = RBLNCosmosTextToWorldPipeline.from_pretrained(folders[0], export=True, safety_checker=checker,
                                                         rbln_config={**SHAPE, "numerics": "exact"})
    assert isinstance(pipe.transformer, ModelMixin) and isinstance(pipe.vae, ModelMixin)
    assert (pipe.device, pipe.dtype) == (reference_pipe.device, reference_pipe.dtype)
    assert _frames(pipe.to("cpu")).shape == (1, 9, 16, 16, 3)
    assert pipe.generation_stats.components["transformer"].calls == 6  # 3 steps x (prompt, negative prompt)
    assert_same_video(pipe, reference_pipe)
    assert pipe.transformer.rbln_config.batch_size == 1  # CFG calls the transformer twice: no doubled batch
    assert pipe.transformer.rbln_config.sample_size == (3, 4, 4)  # 9 frames, 16 px -> 4x compression
    with pytest.raises(ValueError, match="unsafe text"):
        pipe(**{**CALL, "prompt": "two zorblax walk by"})
    # fps is a call-time argument, as in diffusers (it scales the temporal rotary positions, computed on the host).
    torch.testing.assert_close(_frames(pipe, output_type="latent", fps=8),
                               _frames(reference_pipe, output_type="latent", fps=8), atol=1e-5, rtol=0)


@pytest.mark.heavy
def test_transformer_split_over_two_devices_gives_the_same_video(folders):
    checker = PassingChecker()
    reference = CosmosTextToWorldPipeline.from_pretrained(folders[0], safety_checker=checker)
    split = RBLNCosmosTextToWorldPipeline.from_pretrained(
        folders[0], export=True, safety_checker=checker,
        rbln_config={**SHAPE, "numerics": "exact", "transformer": {"tensor_parallel_size": 2, "device": [2, 3]}})
    assert split.transformer.runtimes["model"].devices == [2, 3]
    # Exact numerics: the split adds the partial sums in another order (fp32 rounding, ~1e-7).
    assert_same_video(split, reference)


@pytest.mark.heavy  # ~30 s on a busy 2-core machine; text-to-world keeps the Cosmos path in the fast tier
def test_video_to_world_matches_diffusers_and_round_trips(folders, tmp_path):
    checker = PassingChecker()
    image = PIL.Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    reference = _frames(CosmosVideoToWorldPipeline.from_pretrained(folders[1], safety_checker=checker), image=image)
    pipe = RBLNCosmosVideoToWorldPipeline.from_pretrained(folders[1], export=True, safety_checker=checker,
                                                          rbln_config=SHAPE)
    ours = _frames(pipe, image=image)
    np.testing.assert_allclose(ours, reference, atol=BF16_PIXEL_ATOL, rtol=0)
    assert pipe.generation_stats.components["vae"].calls == 2  # encode the conditioning video, decode
    target = pipe.save_pretrained(tmp_path / "compiled")
    index = json.loads((tmp_path / "compiled" / "model_index.json").read_text())
    assert index["transformer"][1] == "RBLNCosmosTransformer3DModel" and index["vae"][1] == "RBLNAutoencoderKLCosmos"
    assert index["text_encoder"][1] == "RBLNT5EncoderModel"
    assert index["safety_checker"] == [None, None]  # a checker without save_pretrained is not saved...
    with pytest.raises(ValueError, match="needs a safety checker.*safety_checker=RBLNCosmosSafetyChecker"):
        RBLNCosmosVideoToWorldPipeline.from_pretrained(target)  # ...so loading without one is refused
    loaded = RBLNCosmosVideoToWorldPipeline.from_pretrained(target, safety_checker=checker)
    np.testing.assert_array_equal(_frames(loaded, image=image), ours)


def test_no_safety_checker_is_a_clear_error(folders):
    with pytest.raises(ValueError, match="needs a safety checker.*build_tiny_cosmos_guardrail"):
        RBLNCosmosTextToWorldPipeline.from_pretrained(folders[0], export=True, rbln_config=SHAPE)
    with pytest.raises(TypeError, match="lacks"):
        RBLNCosmosTextToWorldPipeline.from_pretrained(folders[0], export=True, rbln_config=SHAPE, safety_checker=object())
    with pytest.raises(ValueError, match="rbln_num_frames - 1 must be a multiple of 4"):
        RBLNCosmosTextToWorldPipeline.from_pretrained(folders[0], export=True, safety_checker=PassingChecker(),
                                                      rbln_config={**SHAPE, "num_frames": 8})


@pytest.mark.heavy
def test_compiled_guardrail_inside_the_pipeline_is_saved_and_loaded_with_it(folders, tmp_path):
    from optimum_npu import RBLNCosmosSafetyChecker
    from optimum_npu.testing import build_tiny_cosmos_guardrail

    guardrail = build_tiny_cosmos_guardrail(tmp_path / "guardrail", blocklist=["zorblax"])
    checker = RBLNCosmosSafetyChecker.from_pretrained(guardrail, export=True,
                                                      rbln_config={"llamaguard3": {"max_seq_len": 512}})
    pipe = RBLNCosmosTextToWorldPipeline.from_pretrained(folders[0], export=True, safety_checker=checker,
                                                         rbln_config=SHAPE)
    video = _frames(pipe)
    assert video.shape == (1, 9, 16, 16, 3)
    assert pipe.generation_stats.components["safety_checker"].device_s > 0  # its sub-models' simulated time
    with pytest.raises(ValueError, match="unsafe text"):
        pipe(**{**CALL, "prompt": "Two Zorblaxes walk by"})
    target = pipe.save_pretrained(tmp_path / "compiled")
    index = json.loads((tmp_path / "compiled" / "model_index.json").read_text())
    assert index["safety_checker"][1] == "RBLNCosmosSafetyChecker"
    loaded = RBLNCosmosTextToWorldPipeline.from_pretrained(target)  # the checker comes back with the folder
    assert isinstance(loaded.safety_checker, RBLNCosmosSafetyChecker)
    np.testing.assert_array_equal(_frames(loaded), video)
