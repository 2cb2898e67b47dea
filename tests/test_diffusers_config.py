"""The nested pipeline configuration: broadcasting, CFG doubling, did-you-mean errors, JSON."""

import json
from types import SimpleNamespace

import pytest

from optimum_npu.diffusers.pipelines.stable_diffusion import RBLNStableDiffusionPipelineConfig


def _models(sample_size=8, vae_blocks=2, max_length=16):
    """What resolution reads of the loaded components: the UNet's and VAE's configs, the tokenizer."""
    return {
        "unet": SimpleNamespace(config=SimpleNamespace(sample_size=sample_size)),
        "vae": SimpleNamespace(config=SimpleNamespace(block_out_channels=(8,) * vae_blocks)),
        "tokenizer": SimpleNamespace(model_max_length=max_length),
    }


def test_pipeline_options_are_broadcast_and_derived_per_component():
    config, rest = RBLNStableDiffusionPipelineConfig.from_kwargs(
        {"rbln_config": {"height": 32, "width": 48, "vae": {"device": 2}}, "rbln_batch_size": 3,
         "rbln_dtype": "float16", "torch_dtype": "unused"})
    assert rest == {"torch_dtype": "unused"}
    resolved = config.resolved(_models())
    assert (resolved.height, resolved.width, resolved.max_seq_len, resolved.guidance_scale) == (32, 48, 16, 7.5)
    # guidance_scale > 1: the UNet sees prompt and negative prompt in one call
    assert resolved.unet.batch_size == 6 and resolved.text_encoder.batch_size == 3 and resolved.vae.batch_size == 3
    assert resolved.unet.sample_size == (16, 24) and resolved.vae.sample_size == (32, 48)  # VAE scale 2
    assert resolved.text_encoder.max_seq_len == resolved.unet.max_seq_len == 16
    assert {c.dtype for c in resolved.components.values()} == {"float16"}
    assert resolved.vae.device == 2 and resolved.unet.device is None


def test_user_component_options_win_and_no_guidance_means_no_doubling():
    config, _ = RBLNStableDiffusionPipelineConfig.from_kwargs(
        {"rbln_config": {"unet": {"batch_size": 1}}, "rbln_batch_size": 1})
    assert config.resolved(_models()).unet.batch_size == 1      # user set it: not doubled
    config, _ = RBLNStableDiffusionPipelineConfig.from_kwargs({"rbln_guidance_scale": 1.0, "rbln_batch_size": 2})
    assert config.resolved(_models()).unet.batch_size == 2


@pytest.mark.parametrize("kwargs, message", [
    ({"rbln_config": {"hieght": 16}}, "Did you mean height"),
    ({"rbln_hieght": 16}, "Did you mean rbln_height"),
    ({"rbln_config": {"unet": {"batch_sise": 2}}}, "Did you mean batch_size"),
    ({"rbln_config": {"unett": {}}}, "Did you mean unet"),
    ({"rbln_config": {"unet": 4}}, "must be a dict of unet's options"),
    ({"rbln_config": {"unet": {"batch_size": 0}}}, "rbln_batch_size must be >= 1"),
    ({"rbln_dtype": "float64"}, "rbln_dtype must be one of"),
    ({"rbln_config": "big"}, "rbln_config must be a dict"),
])
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RBLNStableDiffusionPipelineConfig.from_kwargs(kwargs)


def test_size_not_a_multiple_of_the_vae_scale_is_refused():
    config, _ = RBLNStableDiffusionPipelineConfig.from_kwargs({"rbln_height": 15})
    with pytest.raises(ValueError, match="multiples of 2"):
        config.resolved(_models())


def test_nested_json_round_trip(tmp_path):
    config, _ = RBLNStableDiffusionPipelineConfig.from_kwargs({"rbln_config": {"height": 32, "unet": {"device": 1}}})
    resolved = config.resolved(_models())
    resolved.save(tmp_path)
    data = json.loads((tmp_path / "rbln_config.json").read_text())
    assert data["compile_options"]["height"] == 32
    assert data["components"]["unet"]["compile_options"]["batch_size"] == 2
    loaded = RBLNStableDiffusionPipelineConfig.load(tmp_path, resolved.components, {"create_runtimes": False})
    assert loaded.components == resolved.components and loaded.height == 32 and loaded.create_runtimes is False
    # a component whose own rbln_config.json disagrees with the nested copy: the folder is mixed
    other = RBLNStableDiffusionPipelineConfig.from_kwargs({"rbln_height": 64})[0].resolved(_models())
    with pytest.raises(ValueError, match="disagree on unet"):
        RBLNStableDiffusionPipelineConfig.load(tmp_path, {**resolved.components, "unet": other.unet}, {})


def test_compile_time_options_are_fixed_at_load():
    compiled = RBLNStableDiffusionPipelineConfig.from_kwargs({"rbln_height": 32})[0].resolved(_models())
    compiled.check_load_options(RBLNStableDiffusionPipelineConfig.from_kwargs({"rbln_height": 32,
                                                                             "rbln_create_runtimes": False})[0])
    with pytest.raises(ValueError, match="rbln_height is fixed at compile time"):
        compiled.check_load_options(RBLNStableDiffusionPipelineConfig.from_kwargs({"rbln_height": 16})[0])
    requested = RBLNStableDiffusionPipelineConfig.from_kwargs(
        {"rbln_create_runtimes": False, "rbln_config": {"unet": {"device": 3}}})[0]
    assert requested.load_options_for("unet") == {"create_runtimes": False, "device": 3}
    assert requested.load_options_for("vae") == {"create_runtimes": False}
