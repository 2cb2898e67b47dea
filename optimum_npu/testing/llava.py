"""A tiny random LLaVA checkpoint (CLIP vision tower + projector + Llama), with its processor."""

from __future__ import annotations

import os
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
SEED = 0


def build_tiny_llava(folder: str | os.PathLike, *, image_size: int = 16, patch_size: int = 4,
                     vision_feature_layer: int | list[int] = -2, vision_feature_select_strategy: str = "default",
                     vision_model_type: str = "clip_vision_model", text_model_type: str = "llama",
                     seed: int = SEED) -> Path:
    """Save an untrained tiny `LlavaForConditionalGeneration` (a 2-layer CLIP vision tower, or SigLIP's with
    `vision_model_type="siglip_vision_model"`; the two-layer projector; a 2-layer Llama, or another decoder
    with `text_model_type`, e.g. "qwen2") and its `LlavaProcessor` (the CLIP / SigLIP image processor, the
    tiny Llama tokenizer of `testing.llama` with an `<image>` token, a chat template) into `folder`;
    returns it. Random weights: its text is noise, its shapes and files are LLaVA's."""
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from .llama import build_tokenizer, corpus, tiny_llama_config

    folder = Path(folder)
    tokenizer = build_tokenizer(corpus(num_stories=40, passage_repeats=1), vocab_size=512)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] | upper }}: {% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}\n"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    patches = (image_size // patch_size) ** 2
    image_processor = SiglipImageProcessorPil(size={"height": image_size, "width": image_size}) if (
        vision_model_type == "siglip_vision_model") else CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1 if vision_feature_select_strategy == "default" else 0,
        chat_template=tokenizer.chat_template, image_token=IMAGE_TOKEN)
    llama = tiny_llama_config(tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              max_position_embeddings=256, initializer_range=0.2)  # peaked logits: varied greedy text
    shared = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
              "tie_word_embeddings", "initializer_range")
    text = llama if text_model_type == "llama" else AutoConfig.for_model(
        text_model_type, **{key: getattr(llama, key) for key in shared})
    vision = AutoConfig.for_model(vision_model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=vision_feature_layer, projector_hidden_act="gelu",
                         vision_feature_select_strategy=vision_feature_select_strategy, image_seq_length=patches)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
