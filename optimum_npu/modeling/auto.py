"""Auto classes: pick the RBLN class of a checkpoint or a compiled folder.

A compiled folder names its class in rbln_config.json; a checkpoint is matched on its
config: the RBLN class whose HF class is one of `config.architectures`, else the first of
its `model_type`. Each auto class is limited to one task (the generic class it dispatches
under); `RBLNAutoModel` takes any, or the one named by `task=`.

    model = RBLNAutoModelForImageClassification.from_pretrained("microsoft/resnet-50", export=True)
    model = RBLNAutoModel.from_pretrained("compiled-folder")
"""

from __future__ import annotations

from typing import ClassVar

from ..configuration import RBLNModelConfig
from .base import RBLNModel
from .folder import is_compiled_folder
from .hf_files import hub_kwargs_of, resolve_folder
from .registry import model_class_named, model_classes
from .decoderonly.families import RBLNDecoderOnlyModelForCausalLM
from .encoders import RBLNTextEncoderModel
from .seq2seq.modeling_seq2seq import RBLNModelForSeq2SeqLM
from .seq2seq.whisper import RBLNWhisperForConditionalGeneration
from .hf_files import auto_class_from_pretrained
from .image_classification import RBLNModelForImageClassification
from .llava import RBLNLlavaForConditionalGeneration

# Task name (as transformers pipelines name them) -> the generic class of that task.
TASKS: dict[str, type[RBLNModel]] = {
    "text-generation": RBLNDecoderOnlyModelForCausalLM,
    "text2text-generation": RBLNModelForSeq2SeqLM,
    "automatic-speech-recognition": RBLNWhisperForConditionalGeneration,
    "image-classification": RBLNModelForImageClassification,
    "feature-extraction": RBLNTextEncoderModel,
    "image-text-to-text": RBLNLlavaForConditionalGeneration,
}


class _RBLNAutoClass:
    base_class: ClassVar[type[RBLNModel]] = RBLNModel

    @classmethod
    def class_for(cls, model_id, export: bool = False, task: str | None = None, **hub_kwargs) -> type[RBLNModel]:
        base_class = cls._base_for(task)
        folder = resolve_folder(model_id, hub_kwargs)
        if not export and is_compiled_folder(folder):
            name = RBLNModelConfig.read_json(folder).get("cls_name")
            found = model_class_named(name) if isinstance(name, str) else None
            if found is None or not issubclass(found, base_class):
                raise ValueError(f"{folder} was compiled for {name!r}, which is not a {base_class.__name__} class")
            return found
        from transformers import AutoConfig

        return cls.class_for_config(auto_class_from_pretrained(AutoConfig, folder), task)

    @classmethod
    def class_for_config(cls, hf_config, task: str | None = None, architectures=None) -> type[RBLNModel]:
        base_class = cls._base_for(task)
        model_type = getattr(hf_config, "model_type", None)
        candidates = [c for c in model_classes(model_type) if issubclass(c, base_class)] if isinstance(model_type, str) else []
        if not candidates:
            supported = sorted({c.hf_model_type() for c in model_classes()
                                if issubclass(c, base_class) and c.hf_model_type() is not None})
            raise ValueError(
                f"model_type {model_type!r} is not supported by {cls.__name__} yet; supported: {', '.join(supported)}"
            )
        architectures = architectures or getattr(hf_config, "architectures", None) or []
        named = [c for c in candidates if c.hf_class.__name__ in architectures]
        return (named or candidates)[0]

    @classmethod
    def _base_for(cls, task: str | None) -> type[RBLNModel]:
        if task is None:
            return cls.base_class
        if task not in TASKS or not issubclass(TASKS[task], cls.base_class):
            allowed = [t for t, c in TASKS.items() if issubclass(c, cls.base_class)]
            raise ValueError(f"task must be one of {', '.join(map(repr, allowed))}; got {task!r}")
        return TASKS[task]

    @classmethod
    def from_pretrained(cls, model_id, export: bool = False, task: str | None = None, **kwargs):
        family = cls.class_for(model_id, export, task, **hub_kwargs_of(kwargs))
        return family.from_pretrained(model_id, export=export, **kwargs)

    @classmethod
    def from_model(cls, hf_model, task: str | None = None, **kwargs):
        # The model's own class first (a model built from a config has no `architectures`).
        return cls.class_for_config(hf_model.config, task, [type(hf_model).__name__]).from_model(hf_model, **kwargs)


class RBLNAutoModel(_RBLNAutoClass):
    """Any RBLN model: the class from the checkpoint's architectures / model_type (or `task=`)."""


class RBLNAutoModelForCausalLM(_RBLNAutoClass):
    base_class = RBLNDecoderOnlyModelForCausalLM


class RBLNAutoModelForSeq2SeqLM(_RBLNAutoClass):
    base_class = RBLNModelForSeq2SeqLM


class RBLNAutoModelForSpeechSeq2Seq(_RBLNAutoClass):
    base_class = RBLNWhisperForConditionalGeneration


class RBLNAutoModelForImageClassification(_RBLNAutoClass):
    base_class = RBLNModelForImageClassification


class RBLNAutoModelForTextEncoding(_RBLNAutoClass):
    base_class = RBLNTextEncoderModel


class RBLNAutoModelForImageTextToText(_RBLNAutoClass):
    base_class = RBLNLlavaForConditionalGeneration
