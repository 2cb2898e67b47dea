"""The Cosmos guardrail (optimum_npu.cosmos_guardrail), part by part, on tiny local checkpoints.

- the blocklist: hits and misses, with the variants it must see through (plurals, separators,
  spaced letters, leetspeak, accents) and the words it must not flag (substrings, whitelist);
- the guard LLM: tiny Llamas whose weights force the answer, compiled with our decoder, vs
  transformers' generate on the same weights; the answer parser; fail-closed cases.
"""

from __future__ import annotations

import pytest
import torch

from optimum_npu.cosmos_guardrail.blocklist import Blocklist
from optimum_npu.cosmos_guardrail.guard_llm import RBLNLlamaGuard3, moderation_prompt, parse_moderation_output
from optimum_npu.testing import build_tiny_guard_llm


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny tensors: one thread is faster on the shared 2-core machine and computes the same values."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- blocklist ---------------------------------------------------------------------------

BLOCKLIST = Blocklist(custom=["zorblax", "ass", "blue whale"], exact_match=["Forbidden Phrase"], whitelist=["bass"])


@pytest.mark.parametrize("prompt", [
    "Two Zorblaxes walk by", "a zorblax", "ZORBLAX", "zorblaxing in the street", "zor-blax", "zor.blax",
    "z o r b l a x", "z0rbl4x", "Z0RBL4X!", "zörblax", "zorbl@x", "zorblax,fine", "the ass", "two blue whales",
    "blue, whale", "a forbidden phrase here",
])
def test_blocklist_blocks_variants(prompt):
    safe, message = BLOCKLIST.is_safe(prompt)
    assert not safe
    assert "blocklisted keyword" in message


@pytest.mark.parametrize("prompt", [
    "a robot arm lifts a red cube", "a class of assemblies", "a big bass", "the blue sky and a whale",
    "zorblaks", "forbidden phrases",
])
def test_blocklist_passes_clean_prompts(prompt):
    assert BLOCKLIST.is_safe(prompt) == (True, "no blocklisted keyword")


def test_blocklist_typos_only_when_asked():
    assert Blocklist(custom=["zorblax"]).is_safe("zorblaks")[0]
    assert not Blocklist(custom=["zorblax"], max_typos=1).is_safe("zorblaks")[0]
    assert Blocklist(custom=["ass"], max_typos=1).is_safe("bus")[0]  # short words never fuzzy


def test_blocklist_empty_prompt_and_bad_types():
    assert BLOCKLIST.is_safe("   ") == (False, "the prompt is empty")
    with pytest.raises(TypeError, match="prompt must be a str"):
        BLOCKLIST.is_safe(None)
    with pytest.raises(TypeError, match="custom must be a list of strings"):
        Blocklist(custom="zorblax")
    with pytest.raises(ValueError, match="max_typos must be 0 or 1"):
        Blocklist(max_typos=2)


def test_blocklist_loads_upstream_folder_layout_and_single_file(tmp_path):
    BLOCKLIST.save(tmp_path / "blocklist")
    (tmp_path / "blocklist" / "custom" / "more.txt").write_text("# a comment\n\nflurbo\n")
    loaded = Blocklist.from_path(tmp_path / "blocklist")
    assert loaded.custom == ["zorblax", "ass", "blue whale", "flurbo"]
    assert loaded.whitelist == ["bass"] and loaded.exact_match == ["Forbidden Phrase"]
    assert not loaded.is_safe("three flurbos")[0] and loaded.is_safe("a big bass")[0]

    single = tmp_path / "words.txt"
    single.write_text("zorblax\n")
    assert not Blocklist.from_path(single).is_safe("Two Zorblaxes walk by")[0]


def test_blocklist_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Blocklist.from_path(tmp_path / "nope")
    with pytest.raises(ValueError, match="has none of the subfolders"):
        Blocklist.from_path(tmp_path)
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "bad.txt").write_bytes(b"\xff\xfe\x00zorblax")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        Blocklist.from_path(tmp_path)


# ---- guard LLM -----------------------------------------------------------------------------


@pytest.mark.parametrize("answer, expected", [
    ("safe", (True, ())),
    ("\n\nsafe", (True, ())),
    ("unsafe\nS1,S10", (False, ("S1", "S10"))),
    ("unsafe S3", (False, ("S3",))),
    ("unsafe", (False, ())),
    ("I cannot tell", (False, ())),   # unreadable: fails closed
    ("", (False, ())),
])
def test_parse_moderation_output(answer, expected):
    verdict = parse_moderation_output(answer)
    assert (verdict.safe, verdict.categories) == expected


def test_moderation_prompt_holds_the_policy_and_the_prompt():
    text = moderation_prompt("a robot arm lifts a red cube")
    assert "S1: Violent Crimes." in text and "S14: Code Interpreter Abuse." in text
    assert "User: a robot arm lifts a red cube\n\n<END CONVERSATION>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.fixture(scope="module")
def guard_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    return {answer: build_tiny_guard_llm(root / answer.replace(" ", "_"), answer=answer)
            for answer in ("safe", "unsafe S1 S10")}


def _hf_answer(folder, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer(moderation_prompt(prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_guard_llm_forced_answers_match_transformers(guard_sources):
    prompt = "a robot arm lifts a red cube"
    for answer, folder in guard_sources.items():
        reference = _hf_answer(folder, prompt)
        assert reference.split() == answer.split()   # the weights force the answer in transformers too
        guard = RBLNLlamaGuard3.from_pretrained(folder, export=True)
        verdict = guard.classify(prompt)
        assert verdict.answer.split() == reference.split()
        assert verdict == parse_moderation_output(reference)
        assert guard.calls == 1 and guard.simulated_s > 0
        guard.close()


def test_guard_llm_messages_and_save_load(guard_sources, tmp_path):
    unsafe = RBLNLlamaGuard3.from_pretrained(guard_sources["unsafe S1 S10"], export=True)
    assert unsafe.is_safe("two cars") == (False, "the guard model found the prompt unsafe: S1 (Violent Crimes), "
                                                 "S10 (Hate)")
    unsafe.save_pretrained(tmp_path / "compiled_guard")
    unsafe.close()
    names = {p.name for p in (tmp_path / "compiled_guard").iterdir()}
    assert {"prefill.rbln", "rbln_config.json", "tokenizer.json"} <= names
    loaded = RBLNLlamaGuard3.from_pretrained(tmp_path / "compiled_guard")   # no export: no recompilation
    assert not loaded.is_safe("two cars")[0]
    loaded.close()


def test_guard_llm_fails_closed_on_a_prompt_longer_than_compiled(guard_sources):
    guard = RBLNLlamaGuard3.from_pretrained(guard_sources["safe"], export=True, rbln_config={"max_seq_len": 256})
    assert guard.is_safe("a robot arm lifts a red cube")[0]
    safe, message = guard.is_safe("a robot " * 100)
    assert not safe and "rbln_max_seq_len=256" in message
    guard.close()
