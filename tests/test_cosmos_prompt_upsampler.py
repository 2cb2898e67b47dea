"""Cosmos-Predict1's prompt upsampler: a tiny Mistral chat model compiled with our Mistral family under
tensor parallelism on devices of its own, vs transformers' greedy answer on the same weights; optional in
the text-to-world pipeline, the user's prompt guarded before it is upsampled and the upsampled prompt
guarded in diffusers' own call; saved with the pipeline and loaded back without compiling; the
Mistral-NeMo-12B shape placed and priced on the meta device (heavy)."""


import pytest
import torch
from diffusers import CosmosTextToWorldPipeline
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_npu import RBLNCosmosPromptUpsampler, RBLNCosmosTextToWorldPipeline
from optimum_npu.diffusers.pipelines.cosmos_prompt_upsampler import (
    UPSAMPLE_TASK, clean_upsampled_text, mistral_nemo_12b_config, price_on_meta,
)
from optimum_npu.testing import build_tiny_cosmos, build_tiny_prompt_upsampler

from cosmos_reference import reference_resize_without_torchvision  # noqa: F401  (an autouse fixture)
from no_compiling import forbid_compiling

PROMPT = "a robot arm"
ANSWER = "a detailed video of the robot arm lifting one red cube"
SHAPE = {"height": 16, "width": 16, "num_frames": 9, "max_seq_len": 16, "numerics": "exact"}
CALL = dict(height=16, width=16, num_frames=9, fps=24, max_sequence_length=16, num_inference_steps=1,
            output_type="latent")
UPSAMPLER = {"numerics": "exact", "tensor_parallel_size": 2, "device": [2, 3], "max_seq_len": 128}


class Checker:
    """A stand-in guardrail: refuses prompts with a blocklisted word, passes every video."""

    def __init__(self):
        self.checked = []

    def check_text_safety(self, prompt):
        self.checked.append(prompt)
        return "zorblax" not in prompt

    def check_video_safety(self, frames):
        return frames

    def to(self, *args, **kwargs):
        return self


@pytest.mark.parametrize("text, cleaned", [
    ("Caption: A robot arm\\nlifts a cube.", "A robot arm lifts a cube."),
    ("- **Scene** A robot arm lifts a cube", "A robot arm lifts a cube"),
    ('"A   robot arm lifts a cube"', "A robot arm lifts a cube"),
])
def test_clean_upsampled_text(text, cleaned):
    assert clean_upsampled_text(text.replace("\\n", "\n")) == cleaned


def _hf_upsampled(folder, prompt: str) -> str:
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": UPSAMPLE_TASK + prompt}],
                                         add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False)
    return clean_upsampled_text(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


@pytest.fixture(scope="module")
def upsampler_folder(tmp_path_factory):
    return build_tiny_prompt_upsampler(tmp_path_factory.mktemp("upsampler") / "upsampler", answer=ANSWER)


def test_upsampler_compiled_with_tensor_parallelism_answers_as_transformers(upsampler_folder):
    reference = _hf_upsampled(upsampler_folder, PROMPT)
    assert reference == ANSWER   # the weights force the answer in transformers too
    upsampler = RBLNCosmosPromptUpsampler.from_pretrained(upsampler_folder, export=True, rbln_config=UPSAMPLER)
    assert type(upsampler.model).__name__ == "RBLNMistralForCausalLM"
    assert [m.device for m in upsampler.device_memory()] == [2, 3]   # its own devices, split in two
    assert upsampler.upsample(PROMPT) == reference
    assert upsampler.calls == 1 and upsampler.simulated_s > 0
    upsampler.close()


def test_text_to_world_upsamples_a_guarded_prompt_and_guards_the_result(upsampler_folder, tmp_path, monkeypatch):
    folder = build_tiny_cosmos(tmp_path / "cosmos")
    checker = Checker()
    upsampler = RBLNCosmosPromptUpsampler.from_pretrained(upsampler_folder, export=True, rbln_config=UPSAMPLER)
    pipe = RBLNCosmosTextToWorldPipeline.from_pretrained(folder, export=True, safety_checker=checker,
                                                         prompt_upsampler=upsampler, rbln_config=SHAPE)
    pipe.set_progress_bar_config(disable=True)
    reference = CosmosTextToWorldPipeline.from_pretrained(folder, safety_checker=Checker())
    reference.set_progress_bar_config(disable=True)
    latents = pipe(PROMPT, **CALL, generator=torch.Generator().manual_seed(0)).frames
    assert pipe.last_upsampled_prompt == ANSWER
    assert checker.checked == [PROMPT, ANSWER]   # the user's prompt, then the upsampled one in diffusers' call
    expected = reference(ANSWER, **CALL, generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)   # the world model ran on the upsampled prompt
    assert pipe.generation_stats.components["prompt_upsampler"].calls == 1
    with pytest.raises(ValueError, match="unsafe text in the prompt: zorblax walks. It is not upsampled"):
        pipe("zorblax walks", **CALL)
    assert upsampler.calls == 1   # a refused prompt never reaches the upsampler

    target = pipe.save_pretrained(tmp_path / "compiled")
    upsampler.close()
    forbid_compiling(monkeypatch)
    loaded = RBLNCosmosTextToWorldPipeline.from_pretrained(target, safety_checker=Checker(),
                                                           rbln_config={"transformer": {"device": 1}})
    assert isinstance(loaded.prompt_upsampler, RBLNCosmosPromptUpsampler)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(loaded(PROMPT, **CALL, generator=torch.Generator().manual_seed(0)).frames, latents,
                               atol=0, rtol=0)
    assert RBLNCosmosTextToWorldPipeline.from_pretrained(target, safety_checker=Checker(),
                                                         prompt_upsampler=None).prompt_upsampler is None


@pytest.mark.heavy
def test_the_12b_upsampler_on_four_devices_priced_on_the_meta_device():
    """Mistral-NeMo-12B's shape at TP 4 on the meta device: its bf16 weights (24 GB, more than one 16 GiB
    device) split four ways, and the simulated time of one upsampling (64-token request, 512 new tokens)."""
    config = mistral_nemo_12b_config()
    weights = 2 * (config.vocab_size * config.hidden_size * 2 + config.num_hidden_layers * (
        config.hidden_size * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
        + 3 * config.hidden_size * config.intermediate_size))
    assert weights > 16 * 2**30
    price = price_on_meta(config, tensor_parallel_size=4)
    assert weights / 4 < price["bytes_per_device"] < 16 * 2**30
    assert 0 < price["prefill_s"] < price["upsample_s"] and price["decode_step_s"] > 0
