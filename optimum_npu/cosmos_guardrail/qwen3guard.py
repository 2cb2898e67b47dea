"""Qwen3Guard-Gen: the newer text guard of the upstream Cosmos guardrail, beside Llama-Guard-3.

Upstream (the Cosmos-Predict2.5 / Transfer2.5 guardrail) runs Qwen/Qwen3Guard-Gen-0.6B: the user's
prompt as the one user message of the checkpoint's own chat template (which holds Qwen3Guard's
moderation policy), greedy generation, and an answer of the form "Safety: Safe|Unsafe|Controversial"
with the violated categories named after it. A prompt is refused when the model says Unsafe;
Controversial passes, as upstream. Where upstream lets a prompt through on an answer it cannot
read, this guard fails closed (as our Llama-Guard-3 does): a guard that said nothing readable has
not said the prompt is safe.

The model is a Qwen3 causal LM, compiled with our Qwen3 family (`RBLNAutoModelForCausalLM`).
"""

from __future__ import annotations

import logging
import re

from .guard_llm import GuardVerdict, RBLNGuardLLM, escape_control_text

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "Qwen/Qwen3Guard-Gen-0.6B"
MAX_NEW_TOKENS = 128   # as upstream: "Safety: ...", "Categories: ...", and for responses "Refusal: ..."

# Qwen3Guard's safety categories (the model card's), as the model names them in its answers.
QWEN3GUARD_CATEGORIES = (
    "Violent", "Non-violent Illegal Acts", "Sexual Content or Sexual Acts", "PII", "Suicide & Self-Harm",
    "Unethical Acts", "Politically Sensitive Topics", "Copyright Violation", "Jailbreak",
)
_LABEL = re.compile(r"Safety\s*:\s*(Safe|Unsafe|Controversial)\b", re.IGNORECASE)
_CATEGORY = re.compile("|".join(re.escape(name) for name in sorted(QWEN3GUARD_CATEGORIES, key=len, reverse=True)))


def parse_qwen3guard_output(answer: str) -> GuardVerdict:
    """"Safety: Unsafe" (and the categories named) -> unsafe; Safe or Controversial -> safe, as upstream;
    an answer without a safety label fails closed (unsafe)."""
    label = _LABEL.search(answer)
    if label is None:
        logger.warning("Qwen3Guard's answer %r has no 'Safety: ...' label: treated as unsafe", answer)
        return GuardVerdict(False, (), answer)
    if label.group(1).lower() != "unsafe":
        return GuardVerdict(True, (), answer)
    return GuardVerdict(False, tuple(dict.fromkeys(_CATEGORY.findall(answer))), answer)


class RBLNQwen3Guard(RBLNGuardLLM):
    """Qwen3Guard-Gen compiled to the NPU. `is_safe(prompt)` -> (safe, message)."""

    name = "Qwen3Guard"
    default_model_id = DEFAULT_MODEL_ID

    def __init__(self, model, tokenizer, max_new_tokens: int = MAX_NEW_TOKENS):
        super().__init__(model, tokenizer, max_new_tokens)

    def moderation_text(self, prompt: str) -> str:
        """The checkpoint's chat template on the prompt as the one user message (Qwen's control tokens, written
        `<|name|>`, escaped in it: a prompt cannot end its own turn)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the Qwen3Guard checkpoint's tokenizer has no chat_template: it holds the moderation "
                             "policy the model was trained on; use the checkpoint's own tokenizer files")
        messages = [{"role": "user", "content": escape_control_text(prompt)}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def parse(self, answer: str) -> GuardVerdict:
        return parse_qwen3guard_output(answer)
