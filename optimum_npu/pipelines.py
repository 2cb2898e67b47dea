"""`optimum_npu.pipeline`: `transformers.pipeline` for compiled models, preprocessors included.

transformers' `pipeline(task, model=...)` finds the tokenizer, image processor and feature extractor from the model's
*name* (a Hub id or a folder). Given a model object, which is how a compiled model is passed, it
cannot, and asks for them ("Impossible to guess which image processor to use"), for its own models
too. A compiled model knows its folder: the compiled folder it was loaded from (`save_pretrained`
copies the checkpoint's tokenizer and image processor files into it) or the checkpoint it was
compiled from. This function loads from there what the task's pipeline needs and the caller did not
pass, then calls `transformers.pipeline`; everything else is transformers'.

    from optimum_npu import pipeline
    classify = pipeline("image-classification", model="resnet50-rbln")   # a compiled folder, or a model
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# (pipeline argument, the pipeline class flag saying it loads one, the file that marks one in a folder)
_PREPROCESSORS = (
    ("tokenizer", "_load_tokenizer", ("tokenizer_config.json", "tokenizer.json")),
    ("image_processor", "_load_image_processor", ("preprocessor_config.json",)),
    ("processor", "_load_processor", ("processor_config.json",)),
    ("feature_extractor", "_load_feature_extractor", ("preprocessor_config.json",)),
)


def pipeline(task: str, model: Any, **kwargs: Any):
    """`transformers.pipeline(task, model=model, **kwargs)` where `model` is a compiled model or a
    compiled folder (loaded with `RBLNAutoModel`), its tokenizer / image processor / feature extractor loaded from the
    model's folder unless given."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers import pipeline as transformers_pipeline
    from transformers.pipelines import check_task

    from .modeling.auto import RBLNAutoModel

    if isinstance(model, (str, os.PathLike)):
        model = RBLNAutoModel.from_pretrained(model)
    folder = getattr(model, "_source_folder", None)
    pipeline_class = kwargs.get("pipeline_class") or _pipeline_class(check_task(task)[1]["impl"])
    loaders = {"tokenizer": AutoTokenizer, "image_processor": AutoImageProcessor, "processor": AutoProcessor,
               "feature_extractor": AutoFeatureExtractor}
    for argument, flag, marks in _PREPROCESSORS:
        wanted = getattr(pipeline_class, flag, None)
        if kwargs.get(argument) is None and wanted and folder is not None and \
                any((Path(folder) / mark).is_file() for mark in marks):
            kwargs[argument] = loaders[argument].from_pretrained(folder)
    pipe = transformers_pipeline(task, model=model, **kwargs)
    _greedy_unless_asked(pipe, pipeline_class, model, kwargs)
    return pipe


def _greedy_unless_asked(pipe, pipeline_class, model, kwargs: dict) -> None:
    """A task whose pipeline defaults to beam search (speech recognition: num_beams=5, as OpenAI's
    Whisper) runs greedy on a compiled model, which does not beam-search, unless the user asked for
    beams (then generate() refuses them, saying so)."""
    from .modeling.decoderonly.generation import DeviceCacheGenerationMixin

    default = getattr(pipeline_class, "_default_generation_config", None)
    config = getattr(pipe, "generation_config", None)
    if (isinstance(model, DeviceCacheGenerationMixin) and default is not None and config is not None
            and "generation_config" not in kwargs and (default.num_beams or 1) > 1 and config.num_beams == default.num_beams
            and (getattr(model.generation_config, "num_beams", 1) or 1) == 1):
        logger.info("%s: the pipeline's default num_beams=%d is not run on the NPU; decoding greedily",
                    type(pipe).__name__, default.num_beams)
        config.num_beams = 1


def _pipeline_class(impl):
    """The task's pipeline class: transformers names it by class or, in newer releases, by dotted path."""
    if isinstance(impl, str):
        module, name = impl.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)
    return impl
