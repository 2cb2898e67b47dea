"""Shared by the vLLM tests (test_vllm_*.py): the tiny compiled Llama they serve, and its references.

The tiny Llama of llm_fixtures (hidden 64, 2 layers, vocab 256, a character tokenizer) compiled
with tensor parallelism 2 in exact numerics, so that greedy tokens from vLLM can be compared
with transformers' fp32 generate() and with the compiled model's own generate().
"""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch

from llm_fixtures import make_tokenizer, save_source

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (make setup installs it)")

BATCH = 4
MAX_SEQ_LEN = 128
CHUNK = 64
# A chat template for the character tokenizer, so that /v1/chat/completions has one to apply.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }};{% endfor %}a:"


def build_compiled_llama(root):
    """(compiled folder, HF fp32 model, tokenizer): the tiny Llama compiled TP 2, batch 4,
    max_seq_len 128 (the HF config allows 256), chunk 64, exact numerics, saved with its tokenizer and chat template."""
    from optimum_npu import RBLNAutoModelForCausalLM

    source, hf_model = save_source(root / "source", "llama", tokenizer=False, seed=0)
    tokenizer = make_tokenizer(hf_model.config.vocab_size)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(source)
    model = RBLNAutoModelForCausalLM.from_pretrained(
        str(source), export=True, rbln_batch_size=BATCH, rbln_max_seq_len=MAX_SEQ_LEN,
        rbln_prefill_chunk_size=CHUNK, rbln_tensor_parallel_size=2, rbln_numerics="exact",
    )
    folder = root / "compiled"
    model.save_pretrained(folder)
    return folder, model, hf_model, tokenizer


def greedy_references(model, hf_model, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], list[int]]:
    """(compiled generate(), transformers generate()) greedy new tokens of one prompt."""
    ids = torch.tensor([prompt_ids])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        theirs = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
    return ours[0, len(prompt_ids):].tolist(), theirs[0, len(prompt_ids):].tolist()


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (servers in the tests listen on loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def engines_in_this_process():
    """vLLM engines built inside run in the test's process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the
    model runner can be read, and an error raised for a request reaches the caller."""
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    vllm.envs.disable_envs_cache()  # an engine in this process caches vLLM's environment when it starts
    try:
        yield
    finally:
        vllm.envs.disable_envs_cache()
        if saved is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved
