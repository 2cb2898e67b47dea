"""Tiny random diffusers pipelines, as their `save_pretrained` writes them.

- `build_tiny_stable_diffusion(folder)`: a Stable Diffusion pipeline folder (CLIP text encoder
  and tokenizer, UNet, VAE, PNDM scheduler, and optionally the safety checker with its CLIP image
  processor), as `StableDiffusionPipeline.save_pretrained` writes it.
- `build_tiny_stable_diffusion_xl(folder)`: an SDXL pipeline folder (two CLIP text encoders and
  tokenizers, the UNet with the added text / time embedding, VAE, Euler scheduler).
- `build_tiny_stable_diffusion_3(folder)`: an SD3 pipeline folder (two CLIP text encoders with
  projection, a T5 encoder, their tokenizers, the MMDiT transformer, VAE, flow-matching scheduler).
- `build_tiny_controlnet(folder)`: a ControlNet for the tiny SD (or, with `xl=True`, SDXL) UNet.
- `build_tiny_prompt_upsampler(folder, answer=...)`: a tiny Mistral chat model whose greedy answer to
  the Cosmos prompt-upsampling request is `answer` (Cosmos-Predict1's text-to-world prompt upsampler).
- `build_tiny_cosmos(folder)`: a Cosmos text/video-to-world pipeline folder (T5 encoder and
  tokenizer, Cosmos transformer, Cosmos video VAE, EDM scheduler), without a safety checker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# Words of the prompts used in examples and tests: the tiny tokenizers know them (others are <unk>).
PROMPT_WORDS = (
    "a an the of on in and with by to robot arm lifts red green blue cube ball two walk cat dog sits mat "
    "sky car street city person people face video photo painting astronaut horse riding mountain lake"
).split()


def _tiny_clip_tokenizer(model_max_length: int):
    """A CLIP BPE tokenizer whose vocabulary is every byte-level character plus the words of
    PROMPT_WORDS (merged letter by letter, so each is one token)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    characters = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *characters, *(c + "</w>" for c in characters)]
    merges = []
    for word in PROMPT_WORDS:
        piece = word[0]
        for i, letter in enumerate(word[1:], start=1):
            letter = letter + "</w>" if i == len(word) - 1 else letter
            merges.append((piece, letter))
            piece += letter
            tokens.append(piece)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=model_max_length)


def _tiny_sd_safety_checker():
    """Stable Diffusion's safety checker (a CLIP vision tower and concept embeddings) on 32-pixel crops.

    The 17 concept embeddings are random and their thresholds (`concept_embeds_weights`) 0: an image
    is flagged when its embedding leans towards any of them, which every image of the tiny pipeline
    does; thresholds of 1 (the largest cosine) flag none."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.copy_(torch.randn(17, config.projection_dim))
        checker.special_care_embeds.copy_(torch.randn(3, config.projection_dim))
        checker.concept_embeds_weights.zero_()
        checker.special_care_embeds_weights.fill_(0.5)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def _tiny_vae(sample_size: int, **options):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=sample_size, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, **options,
    )


def build_tiny_stable_diffusion(folder: str | os.PathLike, *, seed: int = 0, sample_size: int = 16,
                                max_seq_len: int = 16, safety_checker: bool = False) -> str:
    """Write a tiny Stable Diffusion pipeline (random weights) to `folder`; returns its path.

    Images are `sample_size` pixels square by default; the VAE downsamples by 2 (two blocks),
    prompts are padded to `max_seq_len` tokens (the tokenizer's model_max_length).
    `safety_checker=True` adds Stable Diffusion's safety checker and its feature extractor.
    """
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tiny_clip_tokenizer(max_seq_len)
    text_encoder = _tiny_clip_text_encoder(tokenizer, max_seq_len)
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=4,
    )
    vae = _tiny_vae(sample_size)
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    checker, feature_extractor = _tiny_sd_safety_checker() if safety_checker else (None, None)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=checker, feature_extractor=feature_extractor, requires_safety_checker=safety_checker,
    )
    pipe.save_pretrained(folder)
    return str(folder)


def _tiny_clip_text_encoder(tokenizer, max_seq_len: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=max_seq_len, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tiny_sdxl_unet(sample_size: int):
    """An SDXL-shaped UNet: cross-attention over both encoders' hidden states (32 + 32), the added
    embedding of the pooled text embedding (32) and 6 time ids of 8 each."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=8,
    )


def build_tiny_stable_diffusion_xl(folder: str | os.PathLike, *, seed: int = 0, sample_size: int = 16,
                                   max_seq_len: int = 16) -> str:
    """Write a tiny SDXL pipeline (random weights) to `folder`; returns its path.

    As SDXL: a CLIP text encoder and a CLIP text encoder with projection (whose pooled, projected
    output is the added text embedding), each with its tokenizer; a UNet taking both encoders'
    penultimate hidden states and the added text / time embedding; the VAE downsamples by 2.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    tokenizer = _tiny_clip_tokenizer(max_seq_len)
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(sample_size), text_encoder=_tiny_clip_text_encoder(tokenizer, max_seq_len),
        text_encoder_2=_tiny_clip_text_encoder(tokenizer, max_seq_len, with_projection=True), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=_tiny_sdxl_unet(sample_size),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         timestep_spacing="leading", steps_offset=1),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return str(folder)


def build_tiny_stable_diffusion_3(folder: str | os.PathLike, *, seed: int = 0, sample_size: int = 16,
                                  max_seq_len: int = 16) -> str:
    """Write a tiny Stable Diffusion 3 pipeline (random weights) to `folder`; returns its path.

    As SD3: two CLIP text encoders with projection (their penultimate hidden states, 32 wide each,
    padded to the T5 width of 64; their pooled projections, 32 each, the pooled embedding of 64), a
    T5 encoder, an MMDiT transformer of one joint block, a VAE with SD3's latent scale and shift
    (downsampling by 2), the flow-matching Euler scheduler. CLIP prompts are padded to `max_seq_len`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, t5_tokenizer = _tiny_clip_tokenizer(max_seq_len), _tiny_t5_tokenizer()
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = SD3Transformer2DModel(
        sample_size=sample_size // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
        pos_embed_max_size=sample_size,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(sample_size, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                      use_post_quant_conv=False),
        text_encoder=_tiny_clip_text_encoder(tokenizer, max_seq_len, with_projection=True), tokenizer=tokenizer,
        text_encoder_2=_tiny_clip_text_encoder(tokenizer, max_seq_len, with_projection=True), tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )
    pipe.save_pretrained(folder)
    return str(folder)


def build_tiny_controlnet(folder: str | os.PathLike, unet_folder: str | os.PathLike, *, seed: int = 0) -> str:
    """Write a ControlNet for the UNet saved in `unet_folder` (a tiny SD or SDXL pipeline's `unet/`)
    to `folder`: its down path mirrors the UNet's (`ControlNetModel.from_unet`), its conditioning
    embedding takes RGB images at the pipeline's pixel size (one stride-2 convolution: the tiny VAE's
    factor). Its zero-initialised output convolutions are filled with random weights, so that the
    control image changes the result (a trained ControlNet's do too)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(unet_folder),
                                           conditioning_embedding_out_channels=(8, 16))
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]:
            for parameter in block.parameters():
                parameter.normal_(0.0, 0.2)
    controlnet.save_pretrained(folder)
    return str(folder)


def _tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer whose pieces are the words of PROMPT_WORDS ("▁word"), the rest <unk>."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in PROMPT_WORDS] + [(",", -1.0), (".", -1.0)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_cosmos(folder: str | os.PathLike, *, video_to_world: bool = False, seed: int = 0) -> str:
    """Write a tiny Cosmos-Predict1-shaped text-to-world (or, with `video_to_world=True`,
    video-to-world: its transformer takes a condition-mask channel) pipeline to `folder`.

    The Cosmos VAE compresses 4x in space and time (patch 2 + one down layer); the transformer
    has 2 blocks of 2 heads. No safety checker is saved: pass one at load (see
    `optimum_npu.testing.build_tiny_cosmos_guardrail` when the guardrail is installed).
    """
    from diffusers import AutoencoderKLCosmos, CosmosTransformer3DModel, EDMEulerScheduler
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = _tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    transformer = CosmosTransformer3DModel(
        in_channels=4 + (1 if video_to_world else 0), out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
        concat_padding_mask=True, extra_pos_embed_type="learnable",
    )
    vae = AutoencoderKLCosmos(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8, 16, 16),
        decode_block_out_channels=(8, 8, 16, 16), attention_resolutions=(8,), resolution=32, num_layers=1, patch_size=2,
        patch_type="haar", spatial_compression_ratio=4, temporal_compression_ratio=4, latents_mean=None,
        latents_std=None,
    )
    scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras",
                                  num_train_timesteps=1000, prediction_type="epsilon", rho=7.0,
                                  final_sigmas_type="sigma_min")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("text_encoder", text_encoder), ("transformer", transformer), ("vae", vae),
                       ("tokenizer", tokenizer), ("scheduler", scheduler)):
        part.save_pretrained(folder / name)
    index = {
        "_class_name": "CosmosVideoToWorldPipeline" if video_to_world else "CosmosTextToWorldPipeline",
        "_diffusers_version": _diffusers_version(),
        "text_encoder": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "CosmosTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLCosmos"],
        "scheduler": ["diffusers", "EDMEulerScheduler"], "safety_checker": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return str(folder)


# A chat template of our own for the tiny prompt upsampler (Mistral's instruction format, in words).
TINY_UPSAMPLER_TEMPLATE = "<s>{% for message in messages %}[INST] {{ message['content'] }} [/INST]{% endfor %}"


def build_tiny_prompt_upsampler(folder: str | os.PathLike, answer: str = "a detailed video of the robot arm lifting "
                                "one red cube", seed: int = 0) -> str:
    """Write a tiny Mistral chat checkpoint (weights, config, word-level tokenizer with a chat template) whose
    greedy answer to "Upsample the short caption to a long caption: <prompt>" is `answer` (distinct words).
    A stand-in for Cosmos-1.0-Prompt-Upsampler-12B-Text2World (Mistral-NeMo-12B-shaped) in its layout."""
    from jinja2 import Template
    from transformers import MistralConfig, MistralForCausalLM

    from ..diffusers.pipelines.cosmos_prompt_upsampler import UPSAMPLE_TASK
    # The word-level tokenizer and the forced-answer weights of the tiny guard LLMs: the same construction.
    from .cosmos_guardrail import _save_forced_guard, _tiny_guard_tokenizer

    def render(text: str) -> str:
        return Template(TINY_UPSAMPLER_TEMPLATE).render(messages=[{"role": "user", "content": UPSAMPLE_TASK + text}])

    tokenizer = _tiny_guard_tokenizer(answer.split() + list(PROMPT_WORDS), render=render,
                                      special_tokens=("<s>", "</s>"))
    tokenizer.chat_template = TINY_UPSAMPLER_TEMPLATE
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
        sliding_window=None, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return str(_save_forced_guard(folder, MistralForCausalLM, config, tokenizer, answer, seed))


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
