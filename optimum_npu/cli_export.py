"""`optimum-npu export`: compile a checkpoint into a compiled folder, as optimum-rbln-cli does.

    optimum-npu export meta-llama/Llama-3.1-8B -o llama-rbln --batch_size 4 --max_seq_len 8192 \\
        --tensor_parallel_size 4
    optimum-npu export sd-folder -o sd-rbln --height 512 --width 512 --unet.batch_size 2
    optimum-npu export ./qwen3 --show-rbln-config --batch_size 2     # the config it would compile with

Every `--key value` that is not one of the command's own flags goes into `rbln_config`: a dotted
key into a sub-config (a pipeline's component, the guardrail's sub-model), `-` in a key read as
`_`, a key without a value is `true`. A value is read as JSON where it parses (`4`, `7.5`, `true`,
`null`, `[0,1]`), `True` / `False` as booleans, `1,2,4` as a list, and anything else as a string.
The class comes from `--class` or from the checkpoint's files, read as data (nothing in the folder
is imported or run): `model_index.json`'s `_class_name` (a diffusers pipeline), `config.json`'s
`architectures` then `model_type`, or the Cosmos guardrail's folder layout. Compiling needs no
device: `create_runtimes` is false unless given. Mistakes are ValueError / TypeError with the
Python API's messages (the `optimum-npu` command prints them in one line).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
from pathlib import Path
from typing import Any

# The command's own flags and whether each takes a value; every other `--key` is an rbln_config option.
OWN_FLAGS = {"-o": True, "--output": True, "--class": True, "--show-rbln-config": False, "-h": False,
             "--help": False, "--hf-revision": True, "--hf-cache-dir": True, "--hf-token": True,
             "--hf-local-files-only": False, "--safety-checker": True,
             "--safety_checker": True}
GUARDRAIL_CLASS = "RBLNCosmosSafetyChecker"


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a checkpoint folder or a Hugging Face Hub id")
    p.add_argument("-o", "--output", metavar="DIR", help="where to save the compiled folder")
    p.add_argument("--class", dest="model_class", metavar="RBLNxxx",
                   help="the RBLN class to compile with (default: read from config.json / model_index.json)")
    p.add_argument("--show-rbln-config", action="store_true",
                   help="print the class and the rbln_config it would compile with, and stop (nothing is compiled)")
    p.add_argument("--safety-checker", "--safety_checker", metavar="DIR",
                   help="Cosmos pipelines: the guardrail to compile in, a compiled RBLNCosmosSafetyChecker folder or a "
                        "guardrail checkpoint (its options as --safety_checker.key VALUE)")
    p.add_argument("--hf-revision", metavar="REV", help="Hub revision (branch, tag or commit)")
    p.add_argument("--hf-cache-dir", metavar="DIR", help="Hub cache folder")
    p.add_argument("--hf-token", metavar="TOKEN", help="Hub token for private repositories")
    p.add_argument("--hf-local-files-only", action="store_true", help="use the Hub cache only")
    p.epilog = ("Any other --key VALUE goes into rbln_config (e.g. --batch_size 4 --max_seq_len 8192 "
                "--tensor_parallel_size 4); --component.key VALUE into a pipeline component's (--unet.batch_size 2).")


# ---- the command line -> rbln_config ---------------------------------------------------------


def split_export_argv(tokens: list[str]) -> tuple[list[str], list[str]]:
    """(the tokens argparse parses, the rbln_config option tokens) of `export`'s command line.

    Split here, not by argparse, so that `--batch_size 4 MODEL` gives batch_size 4 and model MODEL
    whatever the order: a `--key` that is not ours takes the next token as its value unless that
    token starts with `--` (so `--offset -1` is a value too).
    """
    own, options = [], []
    i = 0
    while i < len(tokens):  # bounded: every step consumes at least one token
        token = tokens[i]
        name = token.split("=", 1)[0]
        if token == "--":  # the rest are positionals
            own += tokens[i:]
            break
        if name in OWN_FLAGS or not token.startswith("--"):
            takes_value = OWN_FLAGS.get(name, False) and "=" not in token
            own += tokens[i:i + 1 + takes_value]
            i += 1 + takes_value
            continue
        takes_value = "=" not in token and i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
        options += tokens[i:i + 1 + takes_value]
        i += 1 + takes_value
    return own, options


def parse_value(text: str) -> Any:
    """A command-line value: a JSON literal where it parses, True / False, a comma list, else the string."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    if text in ("True", "False"):  # as Python spells them (optimum-rbln's examples do)
        return text == "True"
    if "," in text:
        return [parse_value(part.strip()) for part in text.split(",")]
    return text


def parse_options(tokens: list[str]) -> dict[str, Any]:
    """rbln_config from `--key value` tokens (as `split_export_argv` returns them), dotted keys nested."""
    config: dict[str, Any] = {}
    i = 0
    while i < len(tokens):  # bounded: every step consumes at least one token
        flag, has_equals, value_text = tokens[i].partition("=")
        if has_equals:
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value_text, i = tokens[i + 1], i + 2
        else:
            value_text, i = "true", i + 1  # a flag on its own switches the option on
        key = flag.removeprefix("--").replace("-", "_")
        if key.startswith("hf_"):
            raise ValueError(_hf_option_error(key))
        path = key.split(".")
        if not all(path):
            raise ValueError(f"{flag}: not an option name (expected --key or --component.key)")
        _set_nested(config, path, parse_value(value_text), flag)
    return config


def _hf_option_error(key: str) -> str:
    if key == "hf_trust_remote_code":
        return ("--hf-trust-remote-code: optimum-npu never runs code from a model folder; it compiles the model "
                "classes transformers and diffusers ship")
    known = ", ".join(f for f in OWN_FLAGS if f.startswith("--hf-"))
    return f"--{key.replace('_', '-')}: unknown Hub option; the Hub options are {known}"


def _set_nested(config: dict, path: list[str], value: Any, flag: str) -> None:
    where = config
    for depth, part in enumerate(path[:-1]):
        where = where.setdefault(part, {})
        if not isinstance(where, dict):
            raise ValueError(f"{flag}: --{'.'.join(path[:depth + 1])} is already given a value, not sub-options")
    if path[-1] in where:
        given = "given twice" if not isinstance(where[path[-1]], dict) else "also given sub-options"
        raise ValueError(f"{flag}: --{'.'.join(path)} is {given}")
    where[path[-1]] = value


# ---- which class ---------------------------------------------------------------------------


def class_names() -> list[str]:
    """The public RBLN classes (models, auto classes, pipelines, the guardrail checker), not imported yet."""
    import optimum_npu

    return [n for n in optimum_npu.__all__ if n.startswith("RBLN") and not n.endswith("Config") and n != "RBLNModel"]


def _import_class(name: str) -> Any:
    """One public class, importing only its module (importing them all takes long and wakes diffusers)."""
    import optimum_npu

    return getattr(optimum_npu, name)


def class_named(name: str) -> Any:
    names = class_names()
    if name in names:
        return _import_class(name)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" Did you mean {close[0]}?" if close else ""
    raise ValueError(f"--class {name}: no such RBLN class.{hint} Classes: {', '.join(sorted(names))}")


def infer_class(model: str, hub_kwargs: dict) -> Any:
    """The RBLN class of a checkpoint, from its files read as JSON (no code of the folder runs)."""
    from .configuration import CONFIG_NAME

    if _source_json(model, CONFIG_NAME, hub_kwargs) is not None:
        raise ValueError(f"{model} is already a compiled folder ({CONFIG_NAME}); export takes the source checkpoint")
    names = class_names()
    index = _source_json(model, "model_index.json", hub_kwargs)
    if index is not None:
        name = index.get("_class_name")
        pipelines = sorted(n.removeprefix("RBLN") for n in names if n.endswith("Pipeline"))
        if not isinstance(name, str) or name not in pipelines:
            raise ValueError(f"{model}: model_index.json names the pipeline {name!r}, which has no RBLN class here; "
                             f"the pipelines are {', '.join(pipelines)}")
        return _import_class(f"RBLN{name}")
    config = _source_json(model, "config.json", hub_kwargs)
    if config is not None:
        return _class_of_hf_config(model, config, names)
    if _is_guardrail_folder(model):
        return _import_class(GUARDRAIL_CLASS)
    raise ValueError(f"{model}: cannot tell which model it is (no config.json or model_index.json, and not a Cosmos "
                     f"guardrail folder); name its class with --class (one of {', '.join(sorted(names))})")


def _class_of_hf_config(model: str, config: dict, names: list[str]) -> Any:
    """The class named after the diffusers `_class_name` or one of `architectures`, else the first
    registered for the transformers `model_type`."""
    architectures = config.get("architectures") or []
    named = [config.get("_class_name"), *(architectures if isinstance(architectures, list) else [])]
    for architecture in named:
        if isinstance(architecture, str) and f"RBLN{architecture}" in names:
            return _import_class(f"RBLN{architecture}")
    from .modeling import auto  # noqa: F401  (registers every transformers model family)
    from .modeling.base import RBLNModel

    model_type = config.get("model_type")
    by_type = RBLNModel._model_types()  # every registered class with an HF class; the first of a model_type wins
    if isinstance(model_type, str) and model_type in by_type and by_type[model_type].__name__ in names:
        return by_type[model_type]
    supported = ", ".join(f"{c.__name__} ({t})" for t, c in sorted(by_type.items()) if c.__name__ in names)
    raise ValueError(f"{model}: model_type {model_type!r} (architectures {architectures}) has no RBLN class here; "
                     f"the classes by model_type: {supported}; or name one with --class")


def _source_json(model: str, filename: str, hub_kwargs: dict) -> dict | None:
    """`filename` of a local folder or a Hub repository as a JSON object; None if it has no such file."""
    from .untrusted_files import read_json_object

    local = Path(model)
    if local.is_dir():
        return read_json_object(local / filename) if (local / filename).is_file() else None
    if local.exists():
        raise ValueError(f"{model} is a file, not a model folder")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        raise ValueError(f"{model}: no such folder, and not a Hugging Face Hub model id either") from None
    try:
        return read_json_object(hf_hub_download(model, filename, **hub_kwargs))
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or hub_kwargs.get("local_files_only"):
            return None  # offline: the cache does not have it (a later step says the model is not there)
        raise
    except EntryNotFoundError:
        return None


def _is_guardrail_folder(model: str) -> bool:
    from .cosmos_guardrail.checker import SUBMODEL_FOLDERS

    folder = Path(model)
    return folder.is_dir() and any((folder / sub).is_dir() for sub in SUBMODEL_FOLDERS.values())


def concrete_class(cls: Any, model: str, hub_kwargs: dict) -> Any:
    """The class that compiles `model`: `cls`, or for an auto / generic class the family it picks."""
    from .modeling.auto import _RBLNAutoClass
    from .modeling.base import RBLNModel

    if isinstance(cls, type) and issubclass(cls, _RBLNAutoClass):
        return cls.class_for(model, export=True, **hub_kwargs)
    if isinstance(cls, type) and issubclass(cls, RBLNModel) and cls.hf_class is None:
        return cls._family_for(cls._read_hf_config(model, hub_kwargs))
    return cls


# ---- the config it compiles with -------------------------------------------------------------


def resulting_config(cls: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The options `cls.from_pretrained(..., export=True, rbln_config=options)` starts from, validated
    as it validates them (null: decided from the checkpoint when compiling)."""
    from .configuration import _to_json

    if cls.__name__ == GUARDRAIL_CLASS:
        from .cosmos_guardrail.checker import RBLNCosmosSafetyCheckerConfig as config_class
    else:
        config_class = cls.config_class
    config, _ = config_class.from_kwargs({"rbln_config": options})
    data = config.to_json_dict()
    shown = {"class": cls.__name__, **{k: data[k] for k in ("config_cls", "compile_options", "runtime_options")}}
    if config.submodule_classes():
        # Each part's options as they reach it; the rest is decided from the checkpoint when it compiles.
        shown["components"] = {name: {k: _to_json(v) for k, v in config.options_for_submodule(name).items()}
                               for name in config.submodule_classes()}
    return shown


def compiled_options(folder: Path) -> dict[str, Any]:
    """The compile options a saved folder records: its own, and each component's (pipelines)."""
    from .configuration import CONFIG_NAME
    from .untrusted_files import read_json_object

    data = read_json_object(folder / CONFIG_NAME)
    shown = {"class": data.get("cls_name"), "compile_options": data.get("compile_options")}
    components = data.get("components")
    if isinstance(components, dict):
        shown["components"] = {name: c.get("compile_options") for name, c in components.items() if isinstance(c, dict)}
    return shown


def _check_output(output: str) -> Path:
    """Refuse an output the save would refuse anyway, before compiling (which may take minutes)."""
    from .configuration import CONFIG_NAME

    target = Path(output)
    if target.exists() and not target.is_dir():
        raise ValueError(f"-o {output}: is a file; give a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / CONFIG_NAME).is_file():
        raise ValueError(f"-o {output}: the folder is not empty and holds no compiled model ({CONFIG_NAME}); "
                         "give a new or empty folder (a compiled folder is updated in place)")
    return target


def _safety_checker(cls: Any, folder: str | None, checker_options: Any, options: dict) -> dict[str, Any]:
    """{"safety_checker": the guardrail} for a Cosmos pipeline (diffusers' pipelines never run without
    one); compiled from a checkpoint with the pipeline's npu / dtype / create_runtimes unless its own
    options say otherwise, or loaded from a compiled folder."""
    if folder is None:
        return {}
    if not hasattr(cls, "_load_safety_checker"):
        raise ValueError(f"--safety-checker: {cls.__name__} takes no guardrail (the Cosmos pipelines do)")
    from .configuration import CONFIG_NAME
    from .cosmos_guardrail import RBLNCosmosSafetyChecker

    if checker_options is not None and not isinstance(checker_options, dict):
        raise ValueError(f"--safety_checker: give its options as --safety_checker.key VALUE; got {checker_options!r}")
    inherited = {k: options[k] for k in ("npu", "dtype", "numerics", "create_runtimes") if k in options}
    compiled = (Path(folder) / CONFIG_NAME).is_file()
    config = {**({} if compiled else inherited), **(checker_options or {})}
    if compiled:
        config.setdefault("create_runtimes", options["create_runtimes"])
    return {"safety_checker": RBLNCosmosSafetyChecker.from_pretrained(folder, export=not compiled, rbln_config=config)}


# ---- the command -----------------------------------------------------------------------------


def export(args: argparse.Namespace, option_tokens: list[str]) -> int:
    options = parse_options(option_tokens)
    hub_kwargs = {k: v for k, v in (("revision", args.hf_revision), ("cache_dir", args.hf_cache_dir),
                                    ("token", args.hf_token)) if v is not None}
    if args.hf_local_files_only:
        hub_kwargs["local_files_only"] = True
    if args.output is None and not args.show_rbln_config:
        raise ValueError("-o DIR is required: where to save the compiled folder (or --show-rbln-config to only look)")
    cls = class_named(args.model_class) if args.model_class else infer_class(args.model, hub_kwargs)
    cls = concrete_class(cls, args.model, hub_kwargs)
    options.setdefault("create_runtimes", False)  # compiling needs no device (optimum-rbln-cli's default)
    checker_options = options.pop("safety_checker", None) if args.safety_checker else None
    if args.show_rbln_config:
        print(json.dumps(resulting_config(cls, options), indent=2))
        return 0
    resulting_config(cls, options)  # every option checked before any weight is read
    target = _check_output(args.output)
    print(f"exporting {args.model} with {cls.__name__}, rbln_config {json.dumps(options)}")
    parts = _safety_checker(cls, args.safety_checker, checker_options, options)
    model = cls.from_pretrained(args.model, export=True, rbln_config=options, **parts, **hub_kwargs)
    saved = Path(model.save_pretrained(target))
    print(json.dumps(compiled_options(saved), indent=2))
    print(f"saved: {saved}")
    return 0
