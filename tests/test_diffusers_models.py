"""Each compiled diffusers component vs its torch module (exact numerics), batches padded and split,
and the errors a wrong call gets."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLCosmos, CosmosTransformer3DModel, ModelMixin, UNet2DConditionModel

from optimum_npu import RBLNAutoencoderKL, compile_from_torch, RBLNAutoencoderKLCosmos, RBLNCosmosTransformer3DModel, RBLNUNet2DConditionModel
from optimum_npu.testing import build_tiny_cosmos, build_tiny_stable_diffusion

EXACT = {"rbln_numerics": "exact"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-diffusers")
    return build_tiny_stable_diffusion(root / "sd"), build_tiny_cosmos(root / "cosmos", video_to_world=True)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_unet_matches_torch_with_padded_and_split_batches(folders, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(f"{folders[0]}/unet").eval()
    compiled = RBLNUNet2DConditionModel.from_model(unet, rbln_batch_size=2, rbln_max_seq_len=16, **EXACT)
    assert isinstance(compiled, ModelMixin) and (compiled.device, compiled.dtype) == (unet.device, unet.dtype)
    for rows in (1, 2, 3):  # padded, exact, split into 2 + 1 (padded)
        sample, text = _randn(rows, 4, 8, 8), _randn(rows, 16, 32, seed=1)
        with torch.no_grad():
            expected = unet(sample, 981, encoder_hidden_states=text).sample
        torch.testing.assert_close(compiled(sample, torch.tensor(981), encoder_hidden_states=text).sample, expected,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="does not support added_cond_kwargs"):
        compiled(sample, 1, text, added_cond_kwargs={"text_embeds": sample})
    with pytest.raises(ValueError, match="compiled for"):
        compiled(_randn(2, 4, 16, 16), 1, _randn(2, 16, 32))
    loaded = RBLNUNet2DConditionModel.from_pretrained(compiled.save_pretrained(tmp_path / "unet"))
    assert isinstance(loaded, ModelMixin)
    public = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))  # noqa: E731
    assert public(loaded.config) == public(compiled.config)  # the diffusers config.json, read back
    torch.testing.assert_close(loaded(sample, 981, text).sample, expected, atol=1e-5, rtol=1e-5)


def test_vae_encoder_and_decoder_match_torch(folders):
    vae = AutoencoderKL.from_pretrained(f"{folders[0]}/vae").eval()
    compiled = RBLNAutoencoderKL.from_model(vae, rbln_uses_encoder=True, **EXACT)
    assert isinstance(compiled, ModelMixin) and (compiled.device, compiled.dtype) == (vae.device, vae.dtype)
    image, latents = _randn(1, 3, 16, 16), _randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled.decode(latents).sample, vae.decode(latents).sample, atol=1e-5, rtol=1e-5)
        ours, theirs = compiled.encode(image).latent_dist, vae.encode(image).latent_dist
    torch.testing.assert_close(ours.mean, theirs.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.sample(torch.Generator().manual_seed(0)), theirs.sample(torch.Generator().manual_seed(0)),
                               atol=1e-5, rtol=1e-5)
    decoder_only = RBLNAutoencoderKL.from_model(vae, **EXACT)
    with pytest.raises(ValueError, match="rbln_uses_encoder=True"):
        decoder_only.encode(image)
    # a compiled model is a torch Module too: compiling it again is refused up front, not deep in export
    with pytest.raises(TypeError, match="already compiled RBLNAutoencoderKL"):
        compile_from_torch(decoder_only, example_inputs=[latents])
    with pytest.raises(ValueError, match="compiles AutoencoderKL models, got a RBLNAutoencoderKL"):
        RBLNAutoencoderKL.from_model(decoder_only, **EXACT)


def test_cosmos_transformer_matches_torch_without_torchvision(folders, monkeypatch):
    import torch.nn.functional as F
    import types

    import diffusers.models.transformers.transformer_cosmos as upstream

    transformer = CosmosTransformer3DModel.from_pretrained(f"{folders[1]}/transformer").eval()
    compiled = RBLNCosmosTransformer3DModel.from_model(
        transformer, rbln_sample_size=(3, 4, 4), rbln_max_seq_len=16, rbln_uses_condition_mask=True, **EXACT)
    assert isinstance(compiled, ModelMixin) and (compiled.device, compiled.dtype) == (transformer.device, transformer.dtype)
    x, text, condition = _randn(1, 4, 3, 4, 4), _randn(1, 16, 32, seed=1), torch.zeros(1, 1, 3, 4, 4)
    condition[:, :, 0] = 1
    padding = torch.zeros(1, 1, 16, 16)
    # The reference resizes the padding mask with torchvision: give it torchvision's nearest resize.
    monkeypatch.setattr(upstream, "transforms", types.SimpleNamespace(
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
        functional=types.SimpleNamespace(resize=lambda t, size, interpolation: F.interpolate(t, size, mode=interpolation))),
        raising=False)
    # fps is a call-time argument, as in diffusers: it scales the temporal rotary positions, computed on the host.
    results = {}
    for fps in (24, 8, None):
        with torch.no_grad():
            expected = transformer(x, torch.tensor([0.3]), text, fps=fps, condition_mask=condition,
                                   padding_mask=padding).sample
        ours = compiled(x, torch.tensor([0.3]), text, fps=fps, condition_mask=condition, padding_mask=padding).sample
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        results[fps] = ours
    assert (results[24] - results[8]).abs().max() > 1e-3   # the frame rate reaches the result
    with pytest.raises(ValueError, match="fps must be a positive number"):
        compiled(x, torch.tensor([0.3]), text, fps=0, condition_mask=condition, padding_mask=padding)
    with pytest.raises(ValueError, match="max_sequence_length=16"):
        compiled(x, torch.tensor([0.3]), _randn(1, 8, 32), fps=24, condition_mask=condition, padding_mask=padding)


def test_a_compile_time_fps_is_deprecated_and_ignored():
    """optimum-rbln deprecated rbln_fps (the RoPE is computed on the host, fps is given at each call): accepted
    with a FutureWarning, for the transformer and the Cosmos pipelines, and not kept."""
    from optimum_npu import RBLNCosmosTextToWorldPipelineConfig, RBLNCosmosTransformer3DModelConfig

    with pytest.warns(FutureWarning, match="rbln_fps is deprecated and ignored.*pass fps= when calling"):
        assert RBLNCosmosTransformer3DModelConfig(fps=24).fps is None
    with pytest.warns(FutureWarning, match="rbln_fps is deprecated"):
        config, _ = RBLNCosmosTextToWorldPipelineConfig.from_kwargs({"rbln_fps": 24, "rbln_height": 16})
    assert config.fps is None and "fps" not in config.explicit_options()


def test_cosmos_vae_matches_torch(folders):
    vae = AutoencoderKLCosmos.from_pretrained(f"{folders[1]}/vae").eval()
    compiled = RBLNAutoencoderKLCosmos.from_model(vae, rbln_sample_size=(9, 16, 16), rbln_uses_encoder=True, **EXACT)
    assert isinstance(compiled, ModelMixin) and (compiled.device, compiled.dtype) == (vae.device, vae.dtype)
    video = _randn(1, 3, 9, 16, 16)
    with torch.no_grad():
        latents = vae.encode(video).latent_dist.mode()
        torch.testing.assert_close(compiled.encode(video).latent_dist.mode(), latents, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compiled.decode(latents).sample, vae.decode(latents).sample, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="frames - 1 must be a multiple of 4"):
        RBLNAutoencoderKLCosmos.from_model(vae, rbln_sample_size=(8, 16, 16), rbln_create_runtimes=False)


def test_the_other_models_do_not_import_diffusers():
    """Only the diffusers models are ModelMixin subclasses: the LLM, encoder and vision classes (the whole
    optimum_npu.modeling package) import without diffusers."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, optimum_npu.modeling as m\n"
            "for info in pkgutil.walk_packages(m.__path__, 'optimum_npu.modeling.'):\n"
            "    importlib.import_module(info.name)\n"
            "assert 'optimum_npu.modeling.decoderonly.modeling_decoderonly' in sys.modules\n"
            "print('diffusers' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
