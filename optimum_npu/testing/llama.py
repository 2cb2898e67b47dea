"""A tiny Llama that writes readable (if memorised) English, built entirely offline.

    build_tiny_llama(folder, steps=200)      # or: python examples/llama/build_tiny_llama.py [folder]
    build_tiny_random_llama(folder, max_position_embeddings=8192)   # untrained, in a second: for options

1. A byte-level BPE tokenizer (`tokenizers`) is trained on a small embedded corpus: the
   opening lines of four public-domain novels plus short stories generated from templates.
   It is wrapped as a `transformers.PreTrainedTokenizerFast` (BOS added, pad token, left padding).
2. A tiny `LlamaConfig` (hidden 128, 4 layers, GQA 4 query / 2 KV heads, llama3 RoPE scaling)
   is trained for 200 AdamW steps on one CPU thread (~40 s), enough for greedy
   decoding to continue the novels and the stories plausibly.
3. Model + tokenizer are saved with `save_pretrained` into the folder. The build is seeded and
   deterministic; an existing folder is reused as is.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_STEPS = 200
SEED = 0
BOS, EOS, PAD = "<s>", "</s>", "<pad>"

# ---- the corpus --------------------------------------------------------------------------

# Opening lines of public-domain novels (Austen 1813, Dickens 1859, Carroll 1865, Melville 1851).
PASSAGES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way.",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to "
    "do: once or twice she had peeped into the book her sister was reading, but it had no pictures or "
    "conversations in it, \"and what is the use of a book,\" thought Alice \"without pictures or "
    "conversations?\" So she was considering in her own mind (as well as she could, for the hot day made her "
    "feel very sleepy and stupid), whether the pleasure of making a daisy-chain would be worth the trouble "
    "of getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran close by her.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the "
    "watery part of the world.",
]

NAMES = ["Tom", "Lily", "Max", "Anna", "Ben", "Sara", "Leo", "Mia"]
ANIMALS = ["fox", "rabbit", "cat", "dog", "bird", "bear", "mouse", "duck"]
ADJECTIVES = ["little", "brave", "happy", "small", "curious", "kind", "old", "clever"]
PLACES = ["forest", "river", "village", "garden", "hill", "lake", "farm", "meadow"]
ACTIVITIES = ["play with friends", "look for berries", "watch the boats", "sing a song", "read a book",
              "catch fish", "pick flowers", "climb the trees"]
OBJECTS = ["a red ball", "a shiny key", "a tiny box", "an old map", "a blue hat", "a golden coin"]
FEELINGS = ["happy", "surprised", "excited", "proud", "curious"]


def story(rng: random.Random) -> str:
    """A short story from a template: the same shape every time, different words."""
    name, animal, adj = rng.choice(NAMES), rng.choice(ANIMALS), rng.choice(ADJECTIVES)
    place, other_place = rng.sample(PLACES, 2)
    activity, obj, feeling = rng.choice(ACTIVITIES), rng.choice(OBJECTS), rng.choice(FEELINGS)
    friend = rng.choice([n for n in NAMES if n != name])
    return (
        f"Once upon a time, there was a {adj} {animal} named {name}. {name} lived near the {place}. "
        f"Every morning, {name} went to the {other_place} to {activity}. One day, {name} found {obj}. "
        f"{name} was very {feeling} and showed it to {friend}. They played together until the sun went down. "
        f"The end."
    )


def corpus(num_stories: int = 400, passage_repeats: int = 40) -> list[str]:
    rng = random.Random(SEED)
    return [story(rng) for _ in range(num_stories)] + PASSAGES * passage_repeats


# ---- tokenizer and model -----------------------------------------------------------------


def build_tokenizer(texts: list[str], vocab_size: int = 768) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="left", model_max_length=512)


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def train(model: LlamaForCausalLM, ids: torch.Tensor, steps: int, seq_len: int = 128, batch: int = 16,
          lr: float = 3e-3, log_every: int = 100) -> float:
    """AdamW on random windows of the token stream, cosine schedule; returns the final loss."""
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch,), generator=gen)
        window = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=window, labels=window).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps}  loss {loss.item():.3f}", flush=True)
    model.eval()
    return loss.item()


def is_built(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def build_tiny_llama(folder: str | Path, steps: int = DEFAULT_STEPS, force: bool = False) -> Path:
    """Train and save the tiny Llama into `folder` (reused if it already holds one); returns the folder."""
    folder = Path(folder)
    if is_built(folder) and not force:
        return folder
    started = time.perf_counter()
    torch.manual_seed(SEED)
    texts = corpus()
    tokenizer = build_tokenizer(texts)
    stream = []
    for text in texts:
        stream += tokenizer(text).input_ids + [tokenizer.eos_token_id]
    ids = torch.tensor(stream)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer))
    params = sum(p.numel() for p in model.parameters())
    print(f"training a {params / 1e6:.2f}M-parameter Llama on {ids.numel()} tokens for {steps} steps ...", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and far faster on a busy machine
    try:
        loss = train(model, ids, steps)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "build_info.json").write_text(json.dumps({"steps": steps, "final_loss": loss, "seed": SEED}, indent=2))
    print(f"saved to {folder} (final loss {loss:.3f}, {time.perf_counter() - started:.0f} s)")
    return folder



def build_tiny_random_llama(folder: str | Path, max_position_embeddings: int = 512, **config_overrides) -> Path:
    """Save an untrained tiny Llama (random weights; the tokenizer of `build_tiny_llama`, trained on a
    few stories) into `folder`; returns it. For trying options a real checkpoint takes and the trained
    model cannot: `max_position_embeddings=8192` allows max_seq_len 8192 with 4096-token KV partitions.
    Its text is noise. Rebuilt every call (a second or two)."""
    folder = Path(folder)
    tokenizer = build_tokenizer(corpus(num_stories=40, passage_repeats=1), vocab_size=512)
    tokenizer.model_max_length = max_position_embeddings
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        # llama3 RoPE scaling from a shorter original context (at most half the positions: transformers
        # warns when it is not shorter)
        rope = {**tiny_llama_config(tokenizer).rope_parameters,
                "original_max_position_embeddings": min(128, max_position_embeddings // 2)}
        config = tiny_llama_config(tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   max_position_embeddings=max_position_embeddings,
                                   **{"rope_parameters": rope, **config_overrides})
        model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
