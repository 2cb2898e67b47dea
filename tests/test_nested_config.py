"""One nested-config mechanism: `submodule(...)` fields of RBLNModelConfig (pipelines, the guardrail, VLMs)."""

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest

from optimum_npu.configuration import RBLNModelConfig, check_int, submodule


@dataclass(frozen=True, kw_only=True)
class _TowerConfig(RBLNModelConfig):
    image_size: int = 8

    def _validate(self) -> None:
        super()._validate()
        check_int("image_size", self.image_size)


@dataclass(frozen=True, kw_only=True)
class _TextConfig(RBLNModelConfig):
    max_seq_len: int = 16


@dataclass(frozen=True, kw_only=True)
class _PairConfig(RBLNModelConfig):
    broadcast_options: ClassVar = ("npu", "dtype", "create_runtimes")
    vision: _TowerConfig | None = submodule(_TowerConfig)
    language: _TextConfig | None = submodule(_TextConfig)


def test_sub_configs_from_dicts_kwargs_and_objects():
    config, rest = _PairConfig.from_kwargs({"rbln_config": {"dtype": "float16", "vision": {"image_size": 16}},
                                            "rbln_vision": {"batch_size": 2}, "rbln_language": {"device": 1},
                                            "torch_dtype": "x"})
    assert rest == {"torch_dtype": "x"}
    assert config.vision == _TowerConfig(image_size=16, batch_size=2) and config.language.device == 1
    assert config.submodule_options == {"vision": {"image_size": 16, "batch_size": 2}, "language": {"device": 1}}
    # broadcast options the user set, then what the parent derives, then the user's own (which win)
    assert config.options_for_submodule("vision", {"batch_size": 4, "image_size": 4}) == {
        "dtype": "float16", "batch_size": 2, "image_size": 16}
    assert config.options_for_submodule("language") == {"dtype": "float16", "device": 1}
    # a config object passed as rbln_config keeps its sub-configs' options; a sub-config object counts by its values
    again, _ = _PairConfig.from_kwargs({"rbln_config": config})
    assert again == config
    direct = _PairConfig(vision=_TowerConfig(image_size=4))
    assert direct.vision.image_size == 4 and direct.submodule_options == {}


@pytest.mark.parametrize("kwargs, error, message", [
    ({"rbln_config": {"vison": {}}}, ValueError, r"Unknown option vison in rbln_config for _PairConfig\. Did you mean vision\?"),
    ({"rbln_visio": {}}, ValueError, r"Did you mean rbln_vision\?"),
    ({"rbln_config": {"vision": {"image_sise": 3}}}, ValueError,
     r"Unknown option image_sise in rbln_config\['vision'\] for _TowerConfig\. Did you mean image_size\? Valid options: "),
    ({"rbln_config": {"vision": 3}}, TypeError, r"rbln_config\['vision'\] must be a dict of vision's options or a _TowerConfig"),
    ({"rbln_vision": {"image_size": 0}}, ValueError, r"rbln_config\['vision'\]: rbln_image_size must be >= 1; got 0"),
    ({"rbln_config": {"language": _TowerConfig()}}, TypeError, r"rbln_config\['language'\] must be a"),
])
def test_bad_nested_options_name_the_field_and_the_allowed_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        _PairConfig.from_kwargs(kwargs)


def test_nested_json_round_trip_and_mixed_folders(tmp_path):
    config, _ = _PairConfig.from_kwargs({"rbln_npu": "RBLN-CA25", "rbln_vision": {"image_size": 16}})
    config = dataclasses.replace(config, language=_TextConfig(batch_size=3), cls_name="Pair")
    config.save(tmp_path)
    data = json.loads((tmp_path / "rbln_config.json").read_text())
    assert data["components"]["vision"]["compile_options"]["image_size"] == 16
    assert data["requested"] == {"vision": {"image_size": 16}}
    loaded = RBLNModelConfig.load(tmp_path)
    assert type(loaded) is _PairConfig and loaded == config
    assert loaded.submodule_options == {"vision": {"image_size": 16}}
    # a sub-config loaded from its own folder replaces the nested copy, and must agree with it
    assert _PairConfig.load(tmp_path, {"vision": _TowerConfig(image_size=16)}).vision == _TowerConfig(image_size=16)
    with pytest.raises(ValueError, match="disagree on vision's compile options"):
        _PairConfig.load(tmp_path, {"vision": _TowerConfig(image_size=32)})
    data["components"]["visoin"] = data["components"].pop("vision")
    (tmp_path / "rbln_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Unknown option visoin .*Did you mean vision"):
        RBLNModelConfig.load(tmp_path)


def test_runtime_options_of_sub_configs_at_load(tmp_path):
    config = _PairConfig(vision=_TowerConfig(image_size=16), cls_name="Pair")
    config.save(tmp_path)
    loaded, _ = _PairConfig.from_compiled(tmp_path, {"rbln_config": {"vision": {"device": 2}}})
    assert loaded.vision.device == 2 and loaded.options_for_submodule("vision") == {"device": 2}
    with pytest.raises(ValueError, match=r"rbln_config\['vision'\]: rbln_image_size is fixed at compile time"):
        _PairConfig.from_compiled(tmp_path, {"rbln_vision": {"image_size": 8}})
