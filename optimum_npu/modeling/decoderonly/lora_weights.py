"""Reading PEFT LoRA adapter folders (untrusted) into the decoder's stacked adapter weights.

A folder is read only at compile time and only through two files: `adapter_config.json` (JSON,
read as any config file is) and `adapter_model.safetensors` (no pickle: a `.bin` adapter is refused; read
only as a regular file, at most the size the adapter's rank and the model's shapes allow). Every
tensor must be a `lora_A` / `lora_B` weight of one of the decoder's projections, of the shape
the rank and the projection give; any other key, or a PEFT option that changes the math in a
way the decoder does not compute (DoRA, LoRA biases, per-module ranks, modules_to_save, ...),
is an error naming the adapter and the option.

The compiled weights hold, per layer and targeted projection, A [slots, R, in] and B [slots,
out, R]: slot 0 the base model (zeros), slot i the adapter of `lora_config.adapters[i-1]`, each
padded to the rank R with zeros (which add nothing) and B multiplied by the adapter's scaling.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from optimum_npu.untrusted_files import read_json_object, read_regular_file

from .lora import OPTION, PROJECTIONS, RBLNLoRAAdapterConfig, RBLNLoRAConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
HEADER_ALLOWANCE = 1 << 20          # the safetensors JSON header beside the tensors
SECTION = {p: ("mlp" if p in ("gate_proj", "up_proj", "down_proj") else "self_attn") for p in PROJECTIONS}
KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# PEFT options that change what an adapter computes in ways the compiled decoder does not: each
# must be unset (None, False or empty) in adapter_config.json.
UNSUPPORTED = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
               "layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
               "alora_invocation_tokens", "use_bdlora")


def projection_shapes(hf_model) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of the model's layers (equal in every layer)."""
    layer = hf_model.model.layers[0]
    modules = {**{p: getattr(layer.self_attn, p) for p in PROJECTIONS[:4]},
               **{p: getattr(layer.mlp, p) for p in PROJECTIONS[4:]}}
    return {p: (m.in_features, m.out_features) for p, m in modules.items()}


def _folder(adapter: RBLNLoRAAdapterConfig) -> Path:
    folder = Path(adapter.lora_path)
    if not folder.is_dir():
        raise ValueError(f"{OPTION}: lora_path of adapter {adapter.lora_name!r} ({adapter.lora_path}) is not a local "
                         f"folder; give a PEFT adapter folder holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (folder / WEIGHTS_FILE).is_file() and (folder / "adapter_model.bin").exists():
        raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r} has only adapter_model.bin, a pickle, which is "
                         f"never loaded (it can run code); save it as {WEIGHTS_FILE} (PEFT's default)")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).exists():
            raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r} has no {name} in {adapter.lora_path}")
        if not (folder / name).is_file():   # a FIFO or a device would block or never end
            raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r}: {folder / name} is not a regular file")
    return folder


def _read_config(adapter: RBLNLoRAAdapterConfig, folder: Path) -> RBLNLoRAAdapterConfig:
    """The adapter with r / lora_alpha / use_rslora filled from its adapter_config.json (the
    user's values win); target_modules is filled from the weights."""
    path = folder / CONFIG_FILE
    data = read_json_object(path)   # a regular file of bounded size, JSON, an object: else a ValueError naming it

    def fail(message: str):
        raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r} ({path}): {message}")

    if data.get("peft_type", "LORA") != "LORA":
        fail(f"peft_type is {data.get('peft_type')!r}; only 'LORA' adapters compile")
    if data.get("bias", "none") != "none":
        fail(f"bias={data.get('bias')!r}: LoRA adapters that train biases are not supported (only 'none')")
    used = [key for key in UNSUPPORTED if data.get(key) not in (None, False, [], {})]
    if used:
        fail(f"{', '.join(f'{k}={data[k]!r}' for k in used)}: not supported (these must be unset)")
    # A key the file leaves out has PEFT's LoraConfig default (r=8, lora_alpha=8, no rsLoRA), as PEFT reads it.
    r = adapter.r if adapter.r is not None else data.get("r", 8)
    alpha = adapter.lora_alpha if adapter.lora_alpha is not None else data.get("lora_alpha", 8)
    rslora = adapter.use_rslora if adapter.use_rslora is not None else data.get("use_rslora", False)
    if adapter.r is not None and data.get("r") not in (None, adapter.r):
        fail(f"r={adapter.r} was given, but the adapter was trained with r={data.get('r')}")
    try:
        return dataclasses.replace(adapter, r=r, lora_alpha=alpha, use_rslora=rslora)
    except ValueError as err:
        fail(str(err).removeprefix(f"{OPTION}: "))


def _read_weights(adapter: RBLNLoRAAdapterConfig, folder: Path, shapes: dict[str, tuple[int, int]],
                  num_layers: int) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, projection): (A [r, in], B [out, r])} of an adapter with a resolved r, every key and
    shape checked."""
    path = folder / WEIGHTS_FILE
    r, widest = adapter.r, max(max(shape) for shape in shapes.values())
    if r > widest:  # a rank above every dimension factors nothing (and would allow a huge file below)
        raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r}: r={r} is larger than the model's widest "
                         f"projection ({widest}); it was not trained for this model")
    # fp32 A and B of every projection of every layer: the most a rank-r adapter of this model holds.
    most = num_layers * sum(r * (i + o) for i, o in shapes.values()) * 4 + HEADER_ALLOWANCE
    raw = read_regular_file(path, most, f"rank-{r} LoRA adapter of this model ({most} bytes at most)")
    try:
        tensors = load_safetensors(raw)
    except Exception as err:  # the format's own parser on untrusted bytes: any failure means a bad file
        raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r}: {path} is not a valid safetensors file "
                         f"({type(err).__name__}: {err})") from None
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.fullmatch(key)
        if match is None or match[3] not in PROJECTIONS or SECTION[match[3]] != match[2]:
            raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r}: {path} holds {key!r}, not a LoRA weight of "
                             f"a decoder projection (base_model.model.model.layers.N.self_attn|mlp.<"
                             f"{'|'.join(PROJECTIONS)}>.lora_A|lora_B.weight); only those compile")
        layer, projection, part = int(match[1]), match[3], match[4]
        in_features, out_features = shapes[projection]
        expected = (r, in_features) if part == "A" else (out_features, r)
        if layer >= num_layers:
            raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r}: {key} is for layer {layer}, but the model has "
                             f"{num_layers} layers: it was trained for another model")
        if tensor.dtype not in FLOAT_DTYPES or tuple(tensor.shape) != expected or not torch.isfinite(tensor).all():
            raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r}: {key} is {tensor.dtype} {list(tensor.shape)}; "
                             f"expected finite float {list(expected)} (r={r}, the model's {projection} is "
                             f"{in_features} -> {out_features})")
        found.setdefault((layer, projection), {})[part] = tensor.float()
    if not found:
        raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r}: {path} holds no LoRA weights")
    for (layer, projection), parts in found.items():
        if set(parts) != {"A", "B"}:
            raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r}: layer {layer} {projection} has lora_"
                             f"{''.join(parts)} without its lora_{'B' if 'A' in parts else 'A'}")
    return {key: (parts["A"], parts["B"]) for key, parts in found.items()}


def _targets(weights) -> tuple[str, ...]:
    return tuple(p for p in PROJECTIONS if any(projection == p for _, projection in weights))


def resolve_adapters(lora_config: RBLNLoRAConfig, hf_model) -> RBLNLoRAConfig:
    """The config with every adapter's r, lora_alpha, use_rslora and target_modules read from its
    folder (each folder checked whole), and max_lora_rank set."""
    shapes, layers = projection_shapes(hf_model), hf_model.config.num_hidden_layers
    resolved = []
    for adapter in lora_config.adapters:
        folder = _folder(adapter)
        adapter = _read_config(adapter, folder)
        targets = _targets(_read_weights(adapter, folder, shapes, layers))
        if adapter.target_modules is not None and adapter.target_modules != targets:
            raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r}: target_modules={list(adapter.target_modules)}"
                             f" was given, but its weights are for {list(targets)}")
        resolved.append(dataclasses.replace(adapter, target_modules=targets))
    rank = max(a.r for a in resolved)
    return RBLNLoRAConfig(adapters=tuple(resolved), max_lora_rank=lora_config.max_lora_rank or rank)


def stacked_weights(lora_config: RBLNLoRAConfig, hf_model) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(layer, projection): (A [slots, R, in], B [slots, out, R] times each adapter's scaling)} for
    every projection some adapter targets, read from the (resolved) config's folders."""
    if not lora_config.is_resolved:
        raise ValueError("stacked_weights needs a resolved LoRA config (resolve_adapters)")
    shapes, layers, rank = projection_shapes(hf_model), hf_model.config.num_hidden_layers, lora_config.rank
    stacks = {}
    for layer in range(layers):
        for projection in lora_config.targets():
            in_features, out_features = shapes[projection]
            stacks[layer, projection] = (torch.zeros(lora_config.num_slots, rank, in_features),
                                         torch.zeros(lora_config.num_slots, out_features, rank))
    for slot, adapter in enumerate(lora_config.adapters, start=1):
        weights = _read_weights(adapter, _folder(adapter), shapes, layers)
        if _targets(weights) != adapter.target_modules:
            raise ValueError(f"{OPTION}: adapter {adapter.lora_name!r} changed on disk while compiling")
        for (layer, projection), (a, b) in weights.items():
            stack_a, stack_b = stacks[layer, projection]
            stack_a[slot, : adapter.r] = a
            stack_b[slot, :, : adapter.r] = b * adapter.scaling
    return stacks


def meta_stacked_weights(lora_config: RBLNLoRAConfig, hf_model) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """The same shapes on the meta device (a memory probe reads no adapter weights)."""
    shapes, rank = projection_shapes(hf_model), lora_config.rank
    with torch.device("meta"):
        return {(layer, p): (torch.empty(lora_config.num_slots, rank, shapes[p][0]),
                             torch.empty(lora_config.num_slots, shapes[p][1], rank))
                for layer in range(hf_model.config.num_hidden_layers) for p in lora_config.targets()}


def low_rank_flops_per_token(lora_config: RBLNLoRAConfig, hf_model) -> float:
    """FLOPs the adapters add per token and layer stack: 2 * R * (in + out) per targeted projection
    and layer (x A^T, then B^T), what the cost model prices beside the base matmuls."""
    shapes = projection_shapes(hf_model)
    per_layer = sum(2 * lora_config.rank * sum(shapes[p]) for p in lora_config.targets())
    return float(per_layer * hf_model.config.num_hidden_layers)
