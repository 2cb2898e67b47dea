"""The Cosmos-Predict1 prompt upsampler: a short text-to-world prompt rewritten into a detailed one.

Upstream (Cosmos-1.0-Prompt-Upsampler-12B-Text2World) is a Mistral-NeMo-12B-shaped chat model asked
"Upsample the short caption to a long caption: <prompt>", at most 512 new tokens in a 1024-token
context, its answer cleaned of list markers and headings. Here the model is compiled with our
Mistral family (`CompiledChatModel` -> `RBLNAutoModelForCausalLM`), so it takes the decoder options:
on a real card, `rbln_config={"tensor_parallel_size": 4, "device": [4, 5, 6, 7]}` puts its 24 GB of
bf16 weights on four devices of their own (the vendor's model zoo runs it so), beside the world
model's. It decodes greedily (upstream samples at temperature 0.01, which is greedy in all but
ties). The checkpoint is a transformers-layout Mistral folder with a chat template.

`RBLNCosmosTextToWorldPipeline` runs it when given one (`prompt_upsampler=`), as upstream's text-to-world
makes it optional: the user's prompt passes the guardrail first, then the upsampled prompt passes it
again inside diffusers' own call, like any prompt.
"""

from __future__ import annotations

import math
import re

from ...modeling.chat_model import CompiledChatModel

UPSAMPLE_TASK = "Upsample the short caption to a long caption: "
MAX_NEW_TOKENS = 512    # upstream's max_gen_len
MAX_SEQ_LEN = 1024      # upstream's context for inference
FOLDER = "prompt_upsampler"   # its subfolder in a saved pipeline


def clean_upsampled_text(text: str) -> str:
    """The model's answer as one caption: on one line, without the short bold list headings it may write
    ("- **Scene**"; a bold item of 10 words or more is content and stays), a leading "Caption:" / list
    marker / heading marks, repeated spaces, or the quotes and punctuation around it (upstream's cleaning)."""
    text = re.sub(r"[\r\n]", " ", text)
    text = re.sub(r"- \*\*(.*?)\*\*", lambda m: m.group(0) if len(re.findall(r"\w+", m.group(1))) >= 10 else "", text)
    for prefix in ("Caption:", "#####", "####", "- ", "* ", ","):
        if text.startswith(prefix):
            text = text[len(prefix):].lstrip()
    return " ".join(text.split()).strip(' -,*:"\'“”')


class RBLNCosmosPromptUpsampler(CompiledChatModel):
    """The text-to-world prompt upsampler compiled to the NPU: `upsample(prompt)` -> the detailed prompt."""

    default_max_seq_len = MAX_SEQ_LEN

    def __init__(self, model, tokenizer, max_new_tokens: int = MAX_NEW_TOKENS):
        super().__init__(model, tokenizer, max_new_tokens)

    def request_text(self, prompt: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the prompt upsampler's tokenizer has no chat_template: the model is a chat model; use "
                             "the checkpoint's own tokenizer files")
        messages = [{"role": "user", "content": UPSAMPLE_TASK + prompt}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def upsample(self, prompt: str) -> str:
        ids = self.token_ids(self.request_text(prompt))
        room = self.model.rbln_config.max_seq_len - ids.shape[1]
        if room < 1:
            raise ValueError(f"the prompt upsampler's request has {ids.shape[1]} tokens, as many as its compiled "
                             f"rbln_max_seq_len={self.model.rbln_config.max_seq_len}: shorten the prompt or recompile "
                             "the upsampler with a larger max_seq_len")
        return clean_upsampled_text(self.generate_text(ids, min(self.max_new_tokens, room)))


def mistral_nemo_12b_config():
    """The upsampler's shape (Mistral-NeMo-12B: 40 layers of 5120, 32 query / 8 KV heads of 128, a 131072-token
    vocabulary), as a transformers MistralConfig."""
    from transformers import MistralConfig

    return MistralConfig(vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1024000,
                         rope_theta=1000000.0, tie_word_embeddings=False)


def price_on_meta(hf_config=None, tensor_parallel_size: int = 4, prompt_tokens: int = 64,
                  new_tokens: int = MAX_NEW_TOKENS, **rbln_options) -> dict[str, float]:
    """Compile the upsampler's shape on the meta device (nothing runs, no weights) with our Mistral family and
    price one upsampling: {"bytes_per_device", "prefill_s", "decode_step_s", "upsample_s"} (a `prompt_tokens`
    request, `new_tokens` generated). Raises the simulator's DeviceMemoryError if it does not fit."""
    from ...planning.meta import compile_decoder_on_meta

    options = {"rbln_max_seq_len": MAX_SEQ_LEN, "rbln_tensor_parallel_size": tensor_parallel_size, **rbln_options}
    config, graphs = compile_decoder_on_meta(hf_config or mistral_nemo_12b_config(), **options)
    prefill, decode = graphs["prefill"], graphs["decoder_batch_1"]
    chunks = math.ceil(prompt_tokens / config.prefill_chunk_size)
    return {"bytes_per_device": float(prefill.device_bytes), "prefill_s": chunks * prefill.estimated_latency_s,
            "decode_step_s": decode.estimated_latency_s,
            "upsample_s": chunks * prefill.estimated_latency_s + new_tokens * decode.estimated_latency_s}
