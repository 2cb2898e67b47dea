"""`RBLNLlavaForConditionalGeneration`: a LLaVA-style vision-language model on the NPU.

Two compiled parts, each with its own options (nested sub-configs, see optimum_npu/configuration.py):

- `vision_tower` -> `image_prefill.rbln`: LLaVA's vision tower (CLIP or SigLIP vision), the hidden
  layer(s) it reads (`vision_feature_layer`; the CLS row dropped for the "default" strategy) and the
  projector, in one graph: pixel_values [images, 3, H, W] -> image features [images, patches, text hidden];
- `language_model` -> `language_model/`: the text model as one of our decoder families (picked from
  `text_config.model_type`: Llama, Qwen2, Qwen3, Mistral) compiled with use_inputs_embeds=True.

`generate(input_ids, pixel_values, attention_mask)` (what LLaVA's processor returns) looks the
prompt's tokens up in the compiled embedding table on the host, puts the image features in place of
the image tokens (as transformers does) and hands the embeddings to the decoder's `generate`, whose
decode steps embed each new token the same way. With rbln_numerics="exact" greedy output equals
transformers' LlavaForConditionalGeneration token for token.

    model = RBLNLlavaForConditionalGeneration.from_pretrained(
        "llava-hf/llava-1.5-7b-hf", export=True,
        rbln_config={"vision_tower": {"device": 0},
                     "language_model": {"tensor_parallel_size": 4, "device": [1, 2, 3, 4], "max_seq_len": 4096}})
    model.save_pretrained("compiled-llava")      # image_prefill.rbln, language_model/, the processor's files
    processor = AutoProcessor.from_pretrained("compiled-llava")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import LlavaForConditionalGeneration

from ..configuration import CONFIG_KWARG, CONFIG_NAME, OPTION_PREFIX, RBLNModelConfig, submodule
from ..sim_device import Runtime
from ..sim_device.stats import sum_memory
from .base import GraphSpec, RBLNModel
from .transformers_pipelines import list_for_pipelines
from .decoderonly.configuration_decoderonly import RBLNDecoderOnlyModelForCausalLMConfig

IMAGE_PREFILL = "image_prefill"       # the vision graph (its file: image_prefill.rbln)
VISION_TOWER, LANGUAGE_MODEL = "vision_tower", "language_model"   # the sub-configs; the language model's folder


@dataclass(frozen=True, kw_only=True)
class RBLNLlavaVisionTowerConfig(RBLNModelConfig):
    """Options of the image_prefill graph (vision tower + projector); batch_size: images per run."""


@dataclass(frozen=True, kw_only=True)
class RBLNLlavaForConditionalGenerationConfig(RBLNModelConfig):
    """The model's options: npu / dtype / numerics / device / create_runtimes / activate_profiler / cache
    and batch_size go to both parts unless a part's own options (`rbln_config["vision_tower"]`,
    `rbln_config["language_model"]`: any decoder option) set them."""

    broadcast_options: ClassVar[tuple[str, ...]] = (
        "npu", "dtype", "numerics", "device", "create_runtimes", "activate_profiler", "cache")
    vision_tower: RBLNLlavaVisionTowerConfig | None = submodule(RBLNLlavaVisionTowerConfig)
    # The text model's family is read from the checkpoint: any decoder's options.
    language_model: RBLNDecoderOnlyModelForCausalLMConfig | None = submodule(RBLNDecoderOnlyModelForCausalLMConfig)

    def _validate(self) -> None:
        super()._validate()
        if self.tensor_parallel_size != 1:
            raise ValueError(f"{OPTION_PREFIX}tensor_parallel_size is the language model's: "
                             f"{CONFIG_KWARG}={{'language_model': {{'tensor_parallel_size': {self.tensor_parallel_size}}}}}")
        requested = self.submodule_options.get(LANGUAGE_MODEL, {})
        if requested.get("use_inputs_embeds", True) is not True:
            raise ValueError(f"{CONFIG_KWARG}['language_model']['use_inputs_embeds'] must be True: the image features "
                             "reach the language model as input embeddings")

    def derived_submodule_options(self, name: str) -> dict:
        """The model's batch_size for both parts (one image per prompt); input embeddings for the language model."""
        derived = {"batch_size": self.batch_size} if "batch_size" in self.explicit_options() else {}
        return {**derived, "use_inputs_embeds": True} if name == LANGUAGE_MODEL else derived


class _ImagePrefill(torch.nn.Module):
    """pixel_values -> projected image features, as LlavaModel.get_image_features computes them."""

    def __init__(self, llava):
        super().__init__()
        self.vision_tower = llava.vision_tower
        self.projector = llava.multi_modal_projector
        self.layers = llava.config.vision_feature_layer
        self.drop_cls = llava.config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values):
        hidden = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        selected = [hidden[layer][:, 1:] if self.drop_cls else hidden[layer] for layer in layers]
        return self.projector(torch.cat(selected, dim=-1))


def _causal_lm(llava):
    """The text model of `llava` as its family's *ForCausalLM (sharing its modules, no copy): what our
    decoder classes compile."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):   # its layers are replaced by the checkpoint's own just below
        model = AutoModelForCausalLM.from_config(llava.config.text_config)
    model.model = llava.model.language_model
    model.lm_head = llava.lm_head
    return model.eval()


class RBLNLlavaForConditionalGeneration(RBLNModel):
    """LLaVA on the simulated NPU (see the module docstring)."""

    hf_class = LlavaForConditionalGeneration
    config_class = RBLNLlavaForConditionalGenerationConfig
    graph_name = IMAGE_PREFILL
    main_input_name = "input_ids"
    input_modalities = ("image", "text")

    def __init__(self, hf_config, rbln_config, graphs, source_folder=None, generation_config=None,
                 language_model=None):
        if language_model is None:
            raise ValueError(f"{type(self).__name__} needs its compiled language model")
        self.language_model = language_model
        if generation_config is not None:   # the checkpoint's (pad / eos tokens), not the text model's defaults
            language_model.generation_config = generation_config
        super().__init__(hf_config, rbln_config, graphs, source_folder, generation_config)

    # ---- compiling --------------------------------------------------------------------

    @classmethod
    def _graph_specs(cls, hf_model, rbln_config: RBLNLlavaVisionTowerConfig) -> list[GraphSpec]:
        vision = hf_model.config.vision_config
        pixels = ("pixel_values", (rbln_config.batch_size, vision.num_channels, vision.image_size, vision.image_size),
                  "float32")
        return [GraphSpec(IMAGE_PREFILL, (pixels,), _ImagePrefill(hf_model.model))]

    @classmethod
    def _from_hf_model(cls, hf_model, config: RBLNLlavaForConditionalGenerationConfig, source_folder: Path | None):
        from .auto import RBLNAutoModelForCausalLM

        cls._check_model_type(hf_model.config)
        if not isinstance(hf_model, cls.hf_class):
            raise ValueError(f"{cls.__name__} compiles {cls.hf_class.__name__} models, got a {type(hf_model).__name__}")
        try:
            vision = RBLNLlavaVisionTowerConfig(**config.options_for_submodule(VISION_TOWER))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{CONFIG_KWARG}[{VISION_TOWER!r}]: {err}") from None
        if vision.create_runtimes:
            vision.check_devices_exist()
        hf_model.eval()
        vision, graphs = cls._compile(hf_model, vision, source_folder)
        specs = {name: [(s.name, list(s.shape), s.dtype) for s in g.program.inputs] for name, g in graphs.items()}
        try:
            language_model = RBLNAutoModelForCausalLM.from_model(_causal_lm(hf_model),
                                                                 rbln_config=config.options_for_submodule(LANGUAGE_MODEL))
        except (TypeError, ValueError) as err:   # name the part whose options are wrong
            raise type(err)(f"{CONFIG_KWARG}[{LANGUAGE_MODEL!r}]: {err}") from None
        config = dataclasses.replace(config, vision_tower=vision.with_compiled(cls_name=cls.__name__, graphs=specs),
                                     language_model=language_model.rbln_config)
        config = config.with_compiled(cls_name=cls.__name__, graphs=specs)
        return cls(hf_model.config, config, graphs, source_folder=source_folder,
                   generation_config=hf_model.generation_config, language_model=language_model)

    # ---- loading ----------------------------------------------------------------------

    @classmethod
    def _load_submodels(cls, folder: Path, config: RBLNLlavaForConditionalGenerationConfig):
        from .auto import RBLNAutoModelForCausalLM

        language_model = RBLNAutoModelForCausalLM.from_pretrained(folder / LANGUAGE_MODEL,
                                                                  rbln_config=config.options_for_submodule(LANGUAGE_MODEL))
        try:
            config = config.with_loaded_submodules({LANGUAGE_MODEL: language_model.rbln_config},
                                                   str(folder / CONFIG_NAME))
        except BaseException:
            language_model.close()
            raise
        return config, {"language_model": language_model}

    @classmethod
    def _check_graphs_against_config(cls, config, graphs: dict, hf_config=None) -> None:
        """The image_prefill program against the vision tower's options (its own npu / dtype / numerics),
        and the image size of the checkpoint's config."""
        if config.vision_tower is None or config.language_model is None:
            raise ValueError(f"{CONFIG_NAME} records no {VISION_TOWER} / {LANGUAGE_MODEL} options: it was edited by "
                             "hand; compile the model again (export=True)")
        if sorted(graphs) != [IMAGE_PREFILL]:
            raise ValueError(f"{CONFIG_NAME} lists the graphs {sorted(graphs)}; {cls.__name__} has {IMAGE_PREFILL!r} "
                             "only: recompile with export=True")
        super()._check_graphs_against_config(config.vision_tower, graphs, None)
        if hf_config is not None:
            vision = hf_config.vision_config
            shape = tuple(graphs[IMAGE_PREFILL].program.inputs[0].shape)
            if shape[1:] != (vision.num_channels, vision.image_size, vision.image_size):
                raise ValueError(f"{IMAGE_PREFILL}.rbln takes images of shape {list(shape[1:])}, but config.json says "
                                 f"{vision.num_channels} x {vision.image_size} x {vision.image_size}: the folder's files "
                                 "do not belong together; recompile with export=True")

    def _create_runtimes(self) -> dict[str, Runtime]:
        vision = self.rbln_config.vision_tower
        if not vision.create_runtimes:
            return {}
        return {IMAGE_PREFILL: Runtime(self.graphs[IMAGE_PREFILL], device=vision.device,
                                       activate_profiler=vision.activate_profiler,
                                       name=f"{type(self).__name__}.{IMAGE_PREFILL}")}

    # ---- saving -----------------------------------------------------------------------

    def _write_files(self, folder: Path) -> None:
        (folder / LANGUAGE_MODEL).mkdir()
        self.language_model._write_files(folder / LANGUAGE_MODEL)
        super()._write_files(folder)   # the manifest last, over the language model's files too

    # ---- running ----------------------------------------------------------------------

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features [images, patches, text hidden size] of pixel_values [images, 3, H, W], on the device."""
        expected = tuple(self.graphs[IMAGE_PREFILL].program.inputs[0].shape[1:])
        if not (isinstance(pixel_values, torch.Tensor) and pixel_values.is_floating_point()
                and pixel_values.dim() == 4 and tuple(pixel_values.shape[1:]) == expected):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a float tensor [images, {', '.join(map(str, expected))}] (what the "
                             f"model's processor makes); got {got}")
        return self._run_graph(IMAGE_PREFILL, [pixel_values.float()])[0]

    def inputs_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt's input embeddings: its tokens looked up in the compiled embedding table, the image
        features of `pixel_values` in place of its image tokens (in order, as transformers places them)."""
        input_ids = self.language_model._check_inputs(input_ids, None, None)
        embeds = self.language_model.runner.embed(input_ids)
        image_tokens = input_ids == self.config.image_token_id
        count = int(image_tokens.sum())
        if pixel_values is None:
            if count:
                raise ValueError(f"the prompt has {count} image token(s) but no pixel_values: pass the images too")
            return embeds
        features = self.get_image_features(pixel_values)
        if count != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"the prompt has {count} image token(s), but {features.shape[0]} image(s) of {features.shape[1]} "
                "patches each need as many: build the prompt with the model's processor (one image token per image "
                "in the text, which it expands)")
        embeds[image_tokens] = features.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds

    def generate(self, inputs: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, generation_config=None, **kwargs):
        """transformers' `generate` with the images: returns the prompt's ids followed by the new tokens, as
        LlavaForConditionalGeneration.generate does. Its simulated figures: `generation_stats` (the language
        model's) and `inference_stats` (the image_prefill runs)."""
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate() needs input_ids (the processor's output: **processor(images=..., text=...))")
        if "inputs_embeds" in kwargs:
            raise ValueError("generate() makes the input embeddings from input_ids and pixel_values; do not pass them")
        embeds = self.inputs_embeds(input_ids, pixel_values)
        return self.language_model.generate(input_ids=input_ids, inputs_embeds=embeds, attention_mask=attention_mask,
                                            generation_config=generation_config, **kwargs)

    @property
    def generation_stats(self):
        return self.language_model.generation_stats

    def device_memory(self) -> list:
        """Device memory per device, of both parts."""
        return sum_memory([*super().device_memory(), *self.language_model.device_memory()])

    def close(self) -> None:
        self.language_model.close()
        super().close()


list_for_pipelines("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING", [RBLNLlavaForConditionalGeneration])
