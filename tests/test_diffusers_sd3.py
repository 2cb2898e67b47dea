"""Stable Diffusion 3 on the simulated NPU vs diffusers, same tiny components and seed: diffusers' own
__call__ on the three compiled text encoders, the MMDiT transformer and the VAE."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from optimum_npu import RBLNStableDiffusion3Pipeline
from optimum_npu.testing.diffusers import build_tiny_stable_diffusion_3

from no_compiling import forbid_compiling

PROMPT = "a red cube on a mat"
T5_LENGTH = 16
# Exact numerics: only the order of float sums in the CPU kernels differs (measured 2e-6 on latents up to ~4).
LATENT_RTOL, LATENT_ATOL = 1e-5, 1e-4
PIXEL_ATOL = 1e-5   # float images in [0, 1], before any uint8 quantisation


def _run(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 3, "max_sequence_length": T5_LENGTH, **kwargs}
    return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return build_tiny_stable_diffusion_3(tmp_path_factory.mktemp("tiny-sd3") / "sd3")


@pytest.fixture(scope="module")
def compiled_sd3(sd3_folder):
    return RBLNStableDiffusion3Pipeline.from_pretrained(sd3_folder, export=True, rbln_numerics="exact",
                                                        rbln_max_seq_len=T5_LENGTH)


def test_sd3_matches_diffusers(sd3_folder, compiled_sd3):
    reference = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    pipe = compiled_sd3
    assert pipe.transformer.rbln_config.max_seq_len == 16 + T5_LENGTH   # CLIP tokens, then T5 tokens
    assert pipe.transformer.rbln_config.batch_size == 2                 # diffusers' default CFG (7.0)
    np.testing.assert_allclose(_run(pipe, output_type="latent"), _run(reference, output_type="latent"),
                               rtol=LATENT_RTOL, atol=LATENT_ATOL)
    stats = pipe.generation_stats
    assert all(stats.components[name].calls == 2 for name in ("text_encoder", "text_encoder_2", "text_encoder_3"))
    assert stats.components["transformer"].calls == 3
    kwargs = {"negative_prompt": "a blue ball", "output_type": "np"}
    np.testing.assert_allclose(_run(pipe, **kwargs), _run(reference, **kwargs), atol=PIXEL_ATOL, rtol=0)
    with pytest.raises(ValueError, match="max_sequence_length=256: .*compiled for 16 T5 tokens"):
        _run(pipe, max_sequence_length=256)
    with pytest.raises(ValueError, match="turns classifier-free guidance off .* its transformer takes 2"):
        _run(pipe, guidance_scale=1.0)


def test_sd3_saves_as_a_diffusers_folder_and_loads_without_recompiling(compiled_sd3, tmp_path, monkeypatch):
    target = compiled_sd3.save_pretrained(tmp_path / "compiled")
    index = json.loads((tmp_path / "compiled" / "model_index.json").read_text())
    assert index["_class_name"] == "RBLNStableDiffusion3Pipeline"
    assert index["transformer"][1] == "RBLNSD3Transformer2DModel" and index["text_encoder_3"][1] == "RBLNT5EncoderModel"
    before = _run(compiled_sd3, output_type="latent", num_inference_steps=2)
    forbid_compiling(monkeypatch)
    loaded = RBLNStableDiffusion3Pipeline.from_pretrained(target, rbln_config={"transformer": {"device": 1}})
    assert loaded.transformer.runtimes["model"].devices == [1]
    np.testing.assert_array_equal(_run(loaded, output_type="latent", num_inference_steps=2), before)
    with pytest.raises(ValueError, match="rbln_max_seq_len is fixed at compile time"):
        RBLNStableDiffusion3Pipeline.from_pretrained(target, rbln_max_seq_len=32)
