"""Hugging Face config files read as data: loading a folder never runs code from it.

transformers' Auto classes (`AutoConfig`, `AutoTokenizer`, `AutoImageProcessor`, ...) follow an
`auto_map` entry in a folder's config files to Python files shipped with the folder and, unless
told otherwise, ask on stdin whether to run them. A model folder is untrusted data, so every
folder we hand to an Auto class is checked here first: one whose config files name code (an
`auto_map`), or whose `config.json` names a `model_type` transformers does not know (only code
from the folder could read it), is refused with a `RemoteCodeError`. No prompt, no import, and
`trust_remote_code` is never passed.

`auto_class_from_pretrained(AutoX, folder)` is the one way our code calls an Auto class on a folder.
`concrete_class(...)` resolves a class named by a file (a pipeline's model_index.json) only to
an allowlisted concrete class: never an Auto class, which would follow `auto_map` in turn.

Also here: where a model id leads (`resolve_folder`: a local folder, else the Hub's cache) and which
of a checkpoint's files travel with the compiled model (`SOURCE_FILES`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..untrusted_files import read_json_object
from .folder import staging_folders

# The files transformers reads to decide which class (and which code) serves a folder.
CONFIG_FILES = (
    "config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "feature_extractor_config.json", "video_preprocessor_config.json",
)
# Keys of those files that name code to import.
CODE_KEYS = ("auto_map",)


class RemoteCodeError(ValueError):
    """A folder that names code to run; loading it is refused (a ValueError, like other bad folders)."""


def _known_model_types():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING


def refuse_remote_code(folder: str | os.PathLike) -> None:
    """RemoteCodeError if a config file of `folder` names code to import, or config.json names a
    model_type transformers does not know; nothing is imported either way."""
    folder = Path(folder)
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = read_json_object(path)
        named = [key for key in CODE_KEYS if key in data]
        if named:
            raise RemoteCodeError(
                f"{path} names remote code ({named[0]}: {str(data[named[0]])[:120]}); optimum-npu never runs code "
                "from a model folder. Remove the entry, or use a folder whose model transformers ships.")
        if name == "config.json" and "model_type" in data:
            model_type = data["model_type"]
            if not isinstance(model_type, str):
                raise ValueError(f"{path} is malformed: model_type must be a string; got {model_type!r}")
            if model_type not in _known_model_types():
                raise RemoteCodeError(
                    f"{path} names model_type {model_type!r}, which transformers does not know: only code shipped "
                    "with the folder could read it, and optimum-npu never runs code from a model folder.")


def auto_class_from_pretrained(auto_class: Any, folder: str | os.PathLike, **kwargs: Any) -> Any:
    """`auto_class.from_pretrained(folder)` for a local folder, once `refuse_remote_code` passed."""
    if "trust_remote_code" in kwargs:
        raise TypeError("trust_remote_code is not accepted: optimum-npu never runs code from a model folder")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    refuse_remote_code(folder)
    return auto_class.from_pretrained(folder, **kwargs)


def _allowed_bases() -> tuple[type, ...]:
    """The concrete kinds of host component a pipeline folder may name."""
    import diffusers
    import transformers

    return (transformers.PreTrainedTokenizerBase, transformers.ImageProcessingMixin,
            transformers.FeatureExtractionMixin, transformers.ProcessorMixin, transformers.PreTrainedModel,
            diffusers.SchedulerMixin, diffusers.ModelMixin)


def is_auto_class(cls: type) -> bool:
    """An Auto factory class (transformers' `Auto*`, diffusers' `AutoModel` / `AutoPipelineFor*`): it picks
    the class to load from the folder, `auto_map` included."""
    return any(part == "auto" or part.startswith("auto_") for part in cls.__module__.split("."))


def concrete_class(module: Any, class_name: str, what: str) -> type:
    """`module.<class_name>` if it is an allowlisted concrete class; else a ValueError naming `what`."""
    found = getattr(module, class_name, None) if class_name.isidentifier() else None
    if not isinstance(found, type) or not hasattr(found, "from_pretrained"):
        raise ValueError(f"{what}: {module.__name__}.{class_name} is not a loadable class")
    if is_auto_class(found):
        raise ValueError(f"{what}: {module.__name__}.{class_name} is an Auto class, which picks the class to load "
                         "from the folder (remote code included); name the concrete class instead")
    if not issubclass(found, _allowed_bases()):
        raise ValueError(f"{what}: {module.__name__}.{class_name} is not a tokenizer, processor, scheduler or model "
                         "class")
    return found


# Files from the source checkpoint that travel with the compiled model: tokenizer, image
# processor, feature extractor and processor files, so that `AutoTokenizer` / `AutoImageProcessor`
# / `pipeline(...)` load from a compiled folder as from the checkpoint.
SOURCE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "vocab.txt", "merges.txt", "added_tokens.json", "spiece.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
    "feature_extractor_config.json",
)

# The largest tokenizer / processor file copied from a checkpoint (tokenizer.json files are tens of MB).
MAX_SOURCE_FILE_BYTES = 512 * 1024 * 1024

# from_pretrained kwargs that say where on the Hub to look, not how to build the model.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")


def hub_kwargs_of(kwargs: dict, pop: bool = False) -> dict:
    return {k: (kwargs.pop(k) if pop else kwargs[k]) for k in HUB_KWARGS if k in kwargs}


def resolve_folder(model_id: str | os.PathLike, hub_kwargs: dict) -> Path:
    """A local folder as is; a Hub id through the standard cache (works offline from the cache)."""
    path = Path(model_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{model_id} is a file, not a model folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    interrupted = staging_folders(path)
    hint = f" An interrupted save left {interrupted[0]}; save the model again." if interrupted else ""
    try:
        validate_repo_id(str(model_id))
    except HFValidationError:
        raise ValueError(f"{model_id}: no such folder, and not a Hugging Face Hub model id either.{hint}") from None
    try:
        return Path(snapshot_download(str(model_id), **hub_kwargs))
    except Exception as err:  # whatever the Hub said, add that we looked for a folder first
        err.add_note(f"There is no local folder {model_id!r} either.{hint}")
        raise
