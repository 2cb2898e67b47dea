"""Tiny random checkpoints for trying optimum-npu offline (examples, tests, a first look).

Every builder writes a folder in the layout the real loading code reads, from configs built
here with small random weights, so what runs on them is the real path: nothing is stubbed.
The results are meaningless as models; their shapes, file layouts and code paths are real.

- `build_tiny_guard_llm(folder, answer="safe")`: a tiny Llama + word-level tokenizer whose
  weights make greedy decoding answer `answer` to any moderation prompt (Llama-Guard-style).
- `build_tiny_cosmos_guardrail(folder, blocklist=[...])`: every part of the Cosmos guardrail
  checkpoint (blocklist, guard LLM answering "safe", SigLIP + safety MLP, RetinaFace).
- `build_tiny_stable_diffusion(folder)`: a Stable Diffusion pipeline folder (CLIP text encoder
  and tokenizer, UNet, VAE, PNDM scheduler), as `StableDiffusionPipeline.save_pretrained` writes it.
- `build_tiny_cosmos(folder)`: a Cosmos text/video-to-world pipeline folder (T5 encoder and
  tokenizer, Cosmos transformer, Cosmos video VAE, EDM scheduler), without a safety checker.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

GUARD_WORDS = (  # words of prompts used in examples and tests, so that they are not all <unk>
    "a robot arm lifts red cube two walk by the on table in of and with blue green sky car street city "
    "person people face video"
).split()
GUARD_PAD, GUARD_UNK = "<pad>", "<unk>"
# Pieces the word-level tokenizer splits text into: newlines, words, single punctuation marks.
_GUARD_PIECES = r"\n|\w+|[^\w\s]"


def _tiny_guard_tokenizer(extra_words: list[str]):
    """A word-level tokenizer that knows every word of the moderation prompt (others are <unk>),
    with the Llama 3 special tokens as single tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .cosmos_guardrail.guard_llm import SPECIAL_TOKENS, moderation_prompt

    template = moderation_prompt(" ".join(GUARD_WORDS + extra_words))
    for token in SPECIAL_TOKENS:
        template = template.replace(token, " ")
    words = [GUARD_PAD, GUARD_UNK] + sorted(set(re.findall(_GUARD_PIECES, template)))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=GUARD_UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(_GUARD_PIECES), behavior="isolated"),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=GUARD_PAD, unk_token=GUARD_UNK)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.eos_token = SPECIAL_TOKENS[1]  # <|eot_id|> ends the assistant's turn
    return tokenizer


def force_greedy_answer(model, tokenizer, answer: str, strength: float = 8.0) -> None:
    """Set the weights of a Llama-like `model` so that greedy decoding answers `answer` then EOS,
    whatever the prompt (as long as it does not end with a word of the answer).

    Each token's embedding gets a large component on one "state" axis: axis 0 for every token
    outside the answer, axis i + 1 for the i-th answer word. The layers keep their small random
    weights, so the last position's hidden state stays on its token's axis; the LM head maps
    axis i to the (i + 1)-th answer token, and the last one to EOS. A bigram machine, in a real
    checkpoint.
    """
    chain = [tokenizer.convert_tokens_to_ids(w) for w in answer.split()]
    if len(set(chain)) != len(chain) or tokenizer.unk_token_id in chain:
        raise ValueError(f"the answer {answer!r} must be distinct words of the tokenizer's vocabulary")
    hidden = model.config.hidden_size
    if len(chain) + 1 > hidden:
        raise ValueError(f"an answer of {len(chain)} words needs hidden_size > {len(chain)}")
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        embed[:, : len(chain) + 1] = 0.0
        embed[:, 0] = strength
        for axis, token in enumerate(chain, start=1):
            embed[token, 0] = 0.0
            embed[token, axis] = strength
        head[:, : len(chain) + 1] = 0.0
        for axis, token in enumerate(chain + [tokenizer.eos_token_id]):
            head[token, axis] = strength


def build_tiny_guard_llm(folder: str | os.PathLike, answer: str = "safe", seed: int = 0,
                         vocab_words: list[str] = ()) -> Path:
    """A tiny Llama guard checkpoint (weights, config, tokenizer) that answers `answer`
    ("safe", or e.g. "unsafe S1") to every moderation prompt. `vocab_words`: extra known words."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_guard_tokenizer(list(vocab_words) + answer.split())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        initializer_range=0.02, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float().eval()
    force_greedy_answer(model, tokenizer, answer)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


# ---- the Cosmos guardrail ------------------------------------------------------------------

TINY_RETINAFACE = dict(backbone_depths=(1, 1, 1, 1), backbone_width=4, fpn_channels=16)
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   image_size=32, patch_size=8)


def _randomize_batch_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random running statistics and affine parameters: with the defaults (mean 0, var 1, identity)
    a network would hide a batch norm that is dropped or applied twice."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def build_tiny_retinaface(folder: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """A tiny random RetinaFace (config.json + model.safetensors), the detector's own layout."""
    from .cosmos_guardrail.face_blur import RetinaFaceConfig, RetinaFaceModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RetinaFaceModel(RetinaFaceConfig(**{**TINY_RETINAFACE, **overrides})).eval()
        _randomize_batch_norms(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(folder)
    return Path(folder)


def build_tiny_video_safety_model(folder: str | os.PathLike, input_size: int, seed: int = 0,
                                  safe_bias: float = 0.0) -> Path:
    """A tiny random frame classifier. `safe_bias` is added to the "Safe" logit: a large positive
    value makes every frame safe, a large negative one every frame unsafe."""
    from .cosmos_guardrail.video_filter import VideoSafetyConfig, VideoSafetyModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VideoSafetyModel(VideoSafetyConfig(input_size=input_size, hidden_sizes=(32, 16))).eval()
        _randomize_batch_norms(model, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            model.network.layers[-1].bias[0] += safe_bias
    model.save_pretrained(folder)
    return Path(folder)


def build_tiny_siglip(folder: str | os.PathLike, seed: int = 0, **overrides) -> Path:
    """A tiny random SigLIP checkpoint (text and vision towers, as the real one) with its image processor."""
    from transformers import SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vision = {**TINY_SIGLIP, **overrides}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    model.save_pretrained(folder)
    size = vision["image_size"]
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    return Path(folder)


def build_tiny_cosmos_guardrail(folder: str | os.PathLike, blocklist: list[str] = (), guard_answer: str = "safe",
                                video_safe: bool = True, seed: int = 0) -> Path:
    """A tiny Cosmos guardrail checkpoint in the layout `RBLNCosmosSafetyChecker.from_pretrained(...,
    export=True)` reads: the keyword `blocklist`, a guard LLM answering `guard_answer`, SigLIP and a
    frame classifier (every frame safe if `video_safe`, else every frame unsafe), and a RetinaFace.
    Returns the folder."""
    from .cosmos_guardrail.blocklist import Blocklist
    from .cosmos_guardrail.checker import BLOCKLIST_FOLDER, SUBMODEL_FOLDERS

    root = Path(folder)
    Blocklist(custom=list(blocklist)).save(root / BLOCKLIST_FOLDER)
    build_tiny_guard_llm(root / SUBMODEL_FOLDERS["llamaguard3"], answer=guard_answer, seed=seed)
    build_tiny_siglip(root / SUBMODEL_FOLDERS["siglip_encoder"], seed=seed)
    build_tiny_video_safety_model(root / SUBMODEL_FOLDERS["video_safety_model"], input_size=TINY_SIGLIP["hidden_size"],
                                  seed=seed, safe_bias=100.0 if video_safe else -100.0)
    build_tiny_retinaface(root / SUBMODEL_FOLDERS["face_blur_filter"], seed=seed)
    return root


# ---- diffusers pipelines ------------------------------------------------------------------

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


def build_tiny_stable_diffusion(folder: str | os.PathLike, *, seed: int = 0, sample_size: int = 16,
                                max_seq_len: int = 16) -> str:
    """Write a tiny Stable Diffusion pipeline (random weights) to `folder`; returns its path.

    Images are `sample_size` pixels square by default; the VAE downsamples by 2 (two blocks),
    prompts are padded to `max_seq_len` tokens (the tokenizer's model_max_length).
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tiny_clip_tokenizer(max_seq_len)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=max_seq_len, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=sample_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        sample_size=sample_size, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    )
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
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


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__
