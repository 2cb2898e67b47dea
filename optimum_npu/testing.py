"""Tiny random checkpoints for trying optimum-npu offline (examples, tests, a first look).

Every builder writes a folder in the layout the real loading code reads, from configs built
here with small random weights, so what runs on them is the real path: nothing is stubbed.
The results are meaningless as models; their shapes, file layouts and code paths are real.

- `build_tiny_guard_llm(folder, answer="safe")`: a tiny Llama + word-level tokenizer whose
  weights make greedy decoding answer `answer` to any moderation prompt (Llama-Guard-style).
- `build_tiny_cosmos_guardrail(folder, blocklist=[...])`: every part of the Cosmos guardrail
  checkpoint (blocklist, guard LLM answering "safe", SigLIP + safety MLP, RetinaFace).

(Tiny Stable Diffusion and Cosmos pipeline builders belong here too, beside these, when the
diffusers pipelines land.)
"""

from __future__ import annotations

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
