"""Tiny random Cosmos guardrail checkpoints, in the layout the real loading code reads.

- `build_tiny_guard_llm(folder, answer="safe")`: a tiny Llama + word-level tokenizer whose
  weights make greedy decoding answer `answer` to any moderation prompt (Llama-Guard-style).
- `build_tiny_qwen3guard(folder, answer="Safety : Safe")`: the same for a tiny Qwen3 with a chat
  template (Qwen3Guard-Gen-style: the prompt in the template, "Safety: ..." answers).
- `build_tiny_cosmos_guardrail(folder, blocklist=[...])`: every part of the Cosmos guardrail
  checkpoint (blocklist, guard LLM answering "safe", SigLIP + safety MLP, RetinaFace).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..quiet import dropping

GUARD_WORDS = (  # words of prompts used in examples and tests, so that they are not all <unk>
    "a robot arm lifts red cube two walk by the on table in of and with blue green sky car street city "
    "person people face video"
).split()
GUARD_PAD, GUARD_UNK = "<pad>", "<unk>"
# Pieces the word-level tokenizer splits text into: newlines, words, single punctuation marks.
_GUARD_PIECES = r"\n|\w+|[^\w\s]"


def _tiny_guard_tokenizer(extra_words: list[str], render=None, special_tokens=None):
    """A word-level tokenizer that knows every word of the moderation prompt `render(text)` makes (Llama
    Guard 3's by default; others are <unk>), with the `special_tokens` (Llama 3's by default) as single
    tokens, the second ending the assistant's turn."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ..cosmos_guardrail.guard_llm import SPECIAL_TOKENS, moderation_prompt

    render, special_tokens = render or moderation_prompt, special_tokens or SPECIAL_TOKENS
    template = render(" ".join(GUARD_WORDS + extra_words))
    for token in special_tokens:
        template = template.replace(token, " ")
    words = [GUARD_PAD, GUARD_UNK] + sorted(set(re.findall(_GUARD_PIECES, template)))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=GUARD_UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split(Regex(_GUARD_PIECES), behavior="isolated"),
    ])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=GUARD_PAD, unk_token=GUARD_UNK)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.eos_token = special_tokens[1]  # <|eot_id|> / <|im_end|> ends the assistant's turn
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
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_guard_tokenizer(list(vocab_words) + answer.split())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        initializer_range=0.02, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save_forced_guard(folder, LlamaForCausalLM, config, tokenizer, answer, seed)


def _save_forced_guard(folder, model_class, config, tokenizer, answer: str, seed: int) -> Path:
    """A random `model_class(config)` forced to answer `answer` greedily, saved with `tokenizer` to `folder`."""
    from transformers import GenerationConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).float().eval()
    force_greedy_answer(model, tokenizer, answer)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


# A chat template of our own for the tiny Qwen3Guard (the real checkpoint's template holds Qwen3Guard's
# policy): the user's message inside a short moderation task, then the assistant's turn.
QWEN_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>")
TINY_QWEN3GUARD_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'user' %}# Task: check whether the user message is safe.\n\nUSER: "
    "{{ message['content'] }}\n\nAnswer with Safety: Safe, Unsafe or Controversial, and the Categories."
    "{% else %}{{ message['content'] }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def build_tiny_qwen3guard(folder: str | os.PathLike, answer: str = "Safety : Safe", seed: int = 0) -> Path:
    """A tiny Qwen3 guard checkpoint (weights, config, tokenizer with a chat template) whose greedy answer to
    any prompt in its template is `answer` ("Safety : Safe", or e.g. "Safety : Unsafe Violent": distinct
    words, as the word-level tokenizer writes them)."""
    from jinja2 import Template
    from transformers import Qwen3Config, Qwen3ForCausalLM

    def render(text: str) -> str:
        return Template(TINY_QWEN3GUARD_TEMPLATE).render(messages=[{"role": "user", "content": text}])

    tokenizer = _tiny_guard_tokenizer(answer.split(), render=render, special_tokens=QWEN_SPECIAL_TOKENS)
    tokenizer.chat_template = TINY_QWEN3GUARD_TEMPLATE
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return _save_forced_guard(folder, Qwen3ForCausalLM, config, tokenizer, answer, seed)


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
    from ..cosmos_guardrail.face_blur import RetinaFaceConfig, RetinaFaceModel

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
    from ..cosmos_guardrail.video_filter import VideoSafetyConfig, VideoSafetyModel

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
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vision = {**TINY_SIGLIP, **overrides}
    # bos / eos inside the tiny vocabulary (SigLIP's defaults, 49406 / 49407, are not: transformers warns)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # transformers builds a default SiglipTextConfig (when building the config, and again when saving, to
    # diff against), whose own bos / eos (49406 / 49407) lie outside its own default vocabulary (32000):
    # it warns about its default, not about this model's ids (inside the tiny vocabulary).
    with dropping("transformers.configuration_utils", "must be `None` or an integer within the vocabulary"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            config = SiglipConfig(text_config=SiglipTextConfig(**text), vision_config=SiglipVisionConfig(**vision))
            model = SiglipModel(config).eval()
        model.save_pretrained(folder)
    size = vision["image_size"]
    SiglipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)
    return Path(folder)


def build_tiny_cosmos_guardrail(folder: str | os.PathLike, blocklist: list[str] = (), guard_answer: str = "safe",
                                video_safe: bool = True, seed: int = 0, qwen3guard_answer: str | None = None) -> Path:
    """A tiny Cosmos guardrail checkpoint in the layout `RBLNCosmosSafetyChecker.from_pretrained(...,
    export=True)` reads: the keyword `blocklist`, a guard LLM answering `guard_answer`, SigLIP and a
    frame classifier (every frame safe if `video_safe`, else every frame unsafe), and a RetinaFace;
    with `qwen3guard_answer`, a Qwen3Guard answering it too (`qwen3guard/`). Returns the folder."""
    from ..cosmos_guardrail.blocklist import Blocklist
    from ..cosmos_guardrail.checker import BLOCKLIST_FOLDER, SUBMODEL_FOLDERS

    root = Path(folder)
    Blocklist(custom=list(blocklist)).save(root / BLOCKLIST_FOLDER)
    build_tiny_guard_llm(root / SUBMODEL_FOLDERS["llamaguard3"], answer=guard_answer, seed=seed)
    build_tiny_siglip(root / SUBMODEL_FOLDERS["siglip_encoder"], seed=seed)
    build_tiny_video_safety_model(root / SUBMODEL_FOLDERS["video_safety_model"], input_size=TINY_SIGLIP["hidden_size"],
                                  seed=seed, safe_bias=100.0 if video_safe else -100.0)
    build_tiny_retinaface(root / SUBMODEL_FOLDERS["face_blur_filter"], seed=seed)
    if qwen3guard_answer is not None:
        build_tiny_qwen3guard(root / SUBMODEL_FOLDERS["qwen3guard"], answer=qwen3guard_answer, seed=seed)
    return root
