"""`CompiledChatModel`: a causal LM compiled with our decoder families, used as a text-in text-out tool
by a larger system (the Cosmos guardrail's guard LLMs, the Cosmos prompt upsampler).

It compiles a checkpoint (export=True: a local folder or a Hub id, tokenizer included) or loads a
compiled folder through `RBLNAutoModelForCausalLM`, so the checkpoint's `model_type` picks the family
(Llama, Qwen3, Mistral, ...) and every decoder option applies (`tensor_parallel_size`, `device`,
`max_seq_len`, ...); it runs greedy `generate()` on one text and keeps the simulated device time of
its calls. A user of it says what text the model reads and what its answer means.
"""

from __future__ import annotations

import os

import torch

DEFAULT_MAX_SEQ_LEN = 2048


class CompiledChatModel:
    """A compiled causal LM and its tokenizer; `generate_text(text, max_new_tokens)` -> the new text."""

    default_model_id: str | None = None
    default_max_seq_len = DEFAULT_MAX_SEQ_LEN   # at export, capped by the model's max_position_embeddings

    def __init__(self, model, tokenizer, max_new_tokens: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.simulated_s = 0.0   # simulated device time of every call so far
        self.calls = 0

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike | None = None, export: bool = False,
                        rbln_config: dict | None = None, **hub_kwargs):
        """Compile a causal-LM checkpoint (export=True) or load a compiled folder; `rbln_config` holds the
        decoder's options."""
        from transformers import AutoConfig, AutoTokenizer

        from .auto import RBLNAutoModelForCausalLM
        from .hf_files import resolve_folder
        from .hf_files import auto_class_from_pretrained

        if model_id is None and cls.default_model_id is None:
            raise ValueError(f"{cls.__name__}.from_pretrained() needs a checkpoint folder or Hub id")
        # A local folder, checked for remote code before each Auto class.
        folder = resolve_folder(cls.default_model_id if model_id is None else model_id, hub_kwargs)
        options = dict(rbln_config or {})
        if export and "max_seq_len" not in options:
            positions = getattr(auto_class_from_pretrained(AutoConfig, folder), "max_position_embeddings", None)
            options["max_seq_len"] = min(cls.default_max_seq_len, positions or cls.default_max_seq_len)
        model = RBLNAutoModelForCausalLM.from_pretrained(folder, export=export, rbln_config=options)
        tokenizer = auto_class_from_pretrained(AutoTokenizer, folder)
        return cls(model, tokenizer)

    @property
    def rbln_config(self):
        """The compiled decoder's options."""
        return self.model.rbln_config

    def save_pretrained(self, folder: str | os.PathLike, *, exist_ok: bool = False) -> str:
        """The compiled decoder folder; it carries the tokenizer files of the checkpoint it came from."""
        return self.model.save_pretrained(folder, exist_ok=exist_ok)

    def token_ids(self, text: str) -> torch.Tensor:
        """`text` as the model's input ids [1, tokens] (the text carries its own special tokens)."""
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def generate_text(self, ids: torch.Tensor, max_new_tokens: int) -> str:
        """Greedy generation after `ids` (at most `max_new_tokens`), decoded without special tokens."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        output = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad)
        self.simulated_s += self.model.generation_stats.total_s
        self.calls += 1
        return self.tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)

    def device_memory(self) -> list:
        return self.model.device_memory()

    def close(self) -> None:
        self.model.close()
