"""Runtime options (device, create_runtimes, activate_profiler, ...) are chosen at each load and
never saved, for every kind of model: a device picked at export is not written to
rbln_config.json (where a load would silently ignore it), a load without one is not pinned to a
device, and a load with one runs there. Decoders, text encoders, image classifiers, a Stable
Diffusion pipeline with per-component devices and the Cosmos guardrail with per-sub-model devices.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from optimum_npu import (
    RBLNAutoModelForImageClassification,
    RBLNBertModel,
    RBLNCosmosSafetyChecker,
    RBLNLlamaForCausalLM,
    RBLNStableDiffusionPipeline,
)
from optimum_npu.testing import (
    build_tiny_cosmos_guardrail,
    build_tiny_image_classifier,
    build_tiny_random_llama,
    build_tiny_stable_diffusion,
)


def saved_configs(folder) -> dict[str, dict]:
    """Every rbln_config.json under `folder` (a pipeline or the guardrail nests one per part)."""
    return {str(p.relative_to(folder)): json.loads(p.read_text()) for p in sorted(Path(folder).rglob("rbln_config.json"))}


# Runtime options that say what a folder holds (not where or how to run it) are recorded: the guardrail's parts.
RECORDED = {"blocklist", "guard_llm", "video_filter", "face_blur", "qwen3guard_llm"}


def assert_no_runtime_option_saved(folder) -> None:
    configs = saved_configs(folder)
    assert configs
    for name, data in configs.items():
        assert set(data["runtime_options"]) <= RECORDED, name
        for nested in data.get("components", {}).values():
            assert nested["runtime_options"] == {}, name
        assert "device" not in data.get("compile_options", {}), name


def devices_of(model) -> set[int]:
    return {d for runtime in model.runtimes.values() for d in runtime.devices}


def test_a_single_model_loads_where_it_is_told_not_where_it_was_exported(tmp_path):
    """One model of each RBLNModel kind: exported on npu2, loaded without a device, then on npu3."""
    bert = tmp_path / "bert"
    with torch.random.fork_rng(devices=[]):
        BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             vocab_size=64, max_position_embeddings=16)).save_pretrained(bert)
    kinds = [
        (RBLNLlamaForCausalLM, build_tiny_random_llama(tmp_path / "llama", max_position_embeddings=128),
         {"rbln_max_seq_len": 128}),
        (RBLNBertModel, bert, {}),
        (RBLNAutoModelForImageClassification, build_tiny_image_classifier(tmp_path / "resnet"), {}),
    ]
    for cls, source, options in kinds:
        exported = cls.from_pretrained(source, export=True, rbln_device=2, **options)
        assert devices_of(exported) == {2}
        folder = exported.save_pretrained(tmp_path / f"{source.name}-compiled")
        exported.close()
        assert_no_runtime_option_saved(folder)

        loaded = cls.from_pretrained(folder)
        assert loaded.rbln_config.device is None, cls.__name__   # not pinned to the export's device
        loaded.close()
        moved = cls.from_pretrained(folder, rbln_device=3)
        assert moved.rbln_config.device == 3 and devices_of(moved) == {3}, cls.__name__
        moved.close()


def test_a_pipeline_loads_its_components_where_the_load_says(tmp_path):
    source = build_tiny_stable_diffusion(tmp_path / "sd")
    pipe = RBLNStableDiffusionPipeline.from_pretrained(source, export=True,
                                                      rbln_config={"unet": {"device": 1}, "vae": {"device": 2}})
    assert devices_of(pipe.unet) == {1} and devices_of(pipe.vae) == {2}
    folder = pipe.save_pretrained(tmp_path / "sd-compiled")
    assert_no_runtime_option_saved(folder)

    loaded = RBLNStableDiffusionPipeline.from_pretrained(folder)
    assert [loaded.unet.rbln_config.device, loaded.vae.rbln_config.device, loaded.text_encoder.rbln_config.device] \
        == [None, None, None]
    placed = RBLNStableDiffusionPipeline.from_pretrained(folder, rbln_config={"unet": {"device": 3}, "vae": {"device": 1}})
    assert devices_of(placed.unet) == {3} and devices_of(placed.vae) == {1}


def test_the_guardrail_loads_its_networks_where_the_load_says(tmp_path):
    source = build_tiny_cosmos_guardrail(tmp_path / "guardrail", blocklist=["zorblax"])
    options = dict(rbln_guard_llm=False, rbln_face_blur=False)
    checker = RBLNCosmosSafetyChecker.from_pretrained(
        source, export=True, rbln_config={"siglip_encoder": {"device": 2}, "video_safety_model": {"device": 3}},
        rbln_frame_stride=6, **options)
    assert devices_of(checker.video_filter.encoder) == {2} and devices_of(checker.video_filter.classifier) == {3}
    folder = checker.save_pretrained(tmp_path / "guardrail-compiled")
    checker.close()
    assert_no_runtime_option_saved(folder)

    loaded = RBLNCosmosSafetyChecker.from_pretrained(folder)
    assert loaded.video_filter.encoder.rbln_config.device is None
    assert loaded.rbln_config.frame_stride != 6   # a runtime option too: the default unless given at load
    loaded.close()
    placed = RBLNCosmosSafetyChecker.from_pretrained(folder, rbln_config={"siglip_encoder": {"device": 1}},
                                                     rbln_frame_stride=6)
    assert devices_of(placed.video_filter.encoder) == {1} and placed.rbln_config.frame_stride == 6
    placed.close()


@pytest.mark.parametrize("bad", [{"device": 7}])
def test_a_device_the_machine_lacks_is_refused_at_load(tmp_path, bad):
    source = build_tiny_image_classifier(tmp_path / "resnet")
    folder = RBLNAutoModelForImageClassification.from_pretrained(
        source, export=True, rbln_create_runtimes=False).save_pretrained(tmp_path / "compiled")
    with pytest.raises(ValueError, match="rbln_device=7 does not exist"):
        RBLNAutoModelForImageClassification.from_pretrained(folder, rbln_config=bad)
