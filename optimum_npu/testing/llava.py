"""A tiny random LLaVA checkpoint (CLIP vision tower + projector + Llama), with its processor."""

from __future__ import annotations

import os
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
SEED = 0


def build_tiny_llava(folder: str | os.PathLike, *, image_size: int = 16, patch_size: int = 4,
                     vision_feature_layer: int = -2, vision_feature_select_strategy: str = "default",
                     seed: int = SEED) -> Path:
    """Save an untrained tiny `LlavaForConditionalGeneration` (a 2-layer CLIP vision tower, the
    two-layer projector, a 2-layer Llama) and its `LlavaProcessor` (the CLIP image processor, the
    tiny Llama tokenizer of `testing.llama` with an `<image>` token, a chat template) into `folder`;
    returns it. Random weights: its text is noise, its shapes and files are LLaVA's."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from .llama import build_tokenizer, corpus, tiny_llama_config

    folder = Path(folder)
    tokenizer = build_tokenizer(corpus(num_stories=40, passage_repeats=1), vocab_size=512)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] | upper }}: {% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}{% endfor %}\n"
        "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    patches = (image_size // patch_size) ** 2
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1 if vision_feature_select_strategy == "default" else 0,
        chat_template=tokenizer.chat_template, image_token=IMAGE_TOKEN)
    text = tiny_llama_config(tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             max_position_embeddings=256, initializer_range=0.2)  # peaked logits: varied greedy text
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
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
