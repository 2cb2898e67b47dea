"""The guard LLM: the second text guardrail, a causal LM asked whether a prompt is safe.

Llama-Guard-3-style (the upstream Cosmos guardrail runs meta-llama/Llama-Guard-3-8B): the user's
prompt is wrapped in a moderation prompt that lists the policy's hazard categories, and the
model answers "safe", or "unsafe" and a line of violated category codes ("unsafe\\nS1,S10").
The model is compiled with our decoder classes (`RBLNAutoModelForCausalLM`: prefill and decode
graphs on the simulated NPU) and runs greedy `generate()`.

The prompt layout and the categories are Llama Guard 3's published prompt format (model card,
https://huggingface.co/meta-llama/Llama-Guard-3-8B, "Prompt format" and "Hazard Taxonomy"):
the model was trained on exactly that text, so it is reproduced here, not paraphrased.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from ..modeling.chat_model import CompiledChatModel

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "meta-llama/Llama-Guard-3-8B"
# The compiled length at export (CompiledChatModel's default, 2048): the policy prompt is ~400 tokens; Cosmos
# prompts are up to a few hundred words.
DEFAULT_MAX_NEW_TOKENS = 16      # "unsafe\nS1,S2,..." is a handful of tokens

# Llama Guard 3's hazard taxonomy (MLCommons), by the codes the model answers with.
LLAMA_GUARD_3_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex Crimes", "S4": "Child Exploitation",
    "S5": "Defamation", "S6": "Specialized Advice", "S7": "Privacy", "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons", "S10": "Hate", "S11": "Self-Harm", "S12": "Sexual Content",
    "S13": "Elections", "S14": "Code Interpreter Abuse",
}

# Special tokens of the Llama 3 tokenizer that frame the conversation.
BEGIN_OF_TEXT, END_OF_TURN = "<|begin_of_text|>", "<|eot_id|>"
START_HEADER, END_HEADER = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = (BEGIN_OF_TEXT, END_OF_TURN, START_HEADER, END_HEADER)


def escape_control_text(user_prompt: str) -> str:
    """The user's text with no Llama 3 control token left in it: every special token of the Llama 3
    tokenizer is written `<|name|>`, so each "<|" becomes "<\\|" (and each "|>" "|\\>"). The guard
    reads the characters, but a prompt cannot close the user's turn with `<|eot_id|>` and open a
    turn of its own; nothing is removed, so escaping cannot assemble a new token either."""
    return user_prompt.replace("<|", "<\\|").replace("|>", "|\\>")


def moderation_prompt(user_prompt: str, categories: dict[str, str] = LLAMA_GUARD_3_CATEGORIES) -> str:
    """The text the guard model reads: the policy, the user's message (control tokens escaped), and
    the question."""
    user_prompt = escape_control_text(user_prompt)
    policy = "\n".join(f"{code}: {name}." for code, name in categories.items())
    return (
        f"{BEGIN_OF_TEXT}{START_HEADER}user{END_HEADER}\n\n"
        "Task: Check if there is unsafe content in 'User' messages in conversations according our safety "
        "policy with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{policy}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\nUser: {user_prompt}\n\n<END CONVERSATION>\n\n"
        "Provide your safety assessment for ONLY THE LAST User message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories."
        f"{END_OF_TURN}{START_HEADER}assistant{END_HEADER}\n\n"
    )


@dataclass(frozen=True)
class GuardVerdict:
    safe: bool
    categories: tuple[str, ...]   # violated categories (Llama Guard's codes "S1", ...; Qwen3Guard's names), when unsafe
    answer: str                   # what the model wrote

    def describe(self, categories: dict[str, str] = LLAMA_GUARD_3_CATEGORIES) -> str:
        if self.safe:
            return f"the guard model answered {self.answer.strip()!r}"
        if not self.categories:
            return f"the guard model answered {self.answer.strip()!r}"
        named = ", ".join(f"{code} ({categories[code]})" if code in categories else code for code in self.categories)
        return f"the guard model found the prompt unsafe: {named}"


def parse_moderation_output(answer: str) -> GuardVerdict:
    """"safe" -> safe; "unsafe" plus category codes -> unsafe. Anything else fails closed (unsafe):
    a guard that cannot be read has not said the prompt is safe."""
    words = answer.split()
    first = words[0].lower().strip(".,:") if words else ""
    if first == "safe":
        return GuardVerdict(True, (), answer)
    codes = tuple(dict.fromkeys(re.findall(r"\bS\d{1,2}\b", answer)))  # in order, without repeats
    if first != "unsafe":
        logger.warning("the guard model's answer %r is neither 'safe' nor 'unsafe': treated as unsafe", answer)
    return GuardVerdict(False, codes, answer)


class RBLNGuardLLM(CompiledChatModel):
    """A guard LLM compiled to the NPU (`CompiledChatModel`: our decoder classes, greedy `generate()`):
    `is_safe(prompt)` -> (safe, message). A guard family gives the text the model reads
    (`moderation_text`) and how its answer reads (`parse`); a prompt the guard cannot read whole fails closed."""

    name = "GuardLLM"
    default_model_id = DEFAULT_MODEL_ID
    categories: dict[str, str] = {}

    def __init__(self, model, tokenizer, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        super().__init__(model, tokenizer, max_new_tokens)

    def moderation_text(self, prompt: str) -> str:
        raise NotImplementedError

    def parse(self, answer: str) -> GuardVerdict:
        raise NotImplementedError

    def classify(self, prompt: str) -> GuardVerdict:
        ids = self.token_ids(self.moderation_text(prompt))
        limit = self.model.rbln_config.max_seq_len
        if ids.shape[1] + self.max_new_tokens > limit:
            # Fail closed: a prompt the guard cannot read whole is not known to be safe.
            return GuardVerdict(False, (), f"(not run: the moderation prompt has {ids.shape[1]} tokens, more than the "
                                           f"compiled rbln_max_seq_len={limit} allows with {self.max_new_tokens} "
                                           "new tokens; recompile the guard with a larger max_seq_len)")
        return self.parse(self.generate_text(ids, self.max_new_tokens))

    def is_safe(self, prompt: str) -> tuple[bool, str]:
        verdict = self.classify(prompt)
        return verdict.safe, verdict.describe(self.categories)


class RBLNLlamaGuard3(RBLNGuardLLM):
    """A Llama-Guard-3-style classifier compiled to the NPU. `is_safe(prompt)` -> (safe, message)."""

    name = "LlamaGuard3"
    categories = LLAMA_GUARD_3_CATEGORIES

    def moderation_text(self, prompt: str) -> str:
        return moderation_prompt(prompt, self.categories)

    def parse(self, answer: str) -> GuardVerdict:
        return parse_moderation_output(answer)
