"""The examples run as they are: quickstart, the Llama generation script and its notebook, the
image classification script and its notebook.

The Llama is trained for fewer steps than the example's default (the test checks the flow and
the exact-numerics parity, not the prose), once per module, in a temporary folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from example_helpers import EXAMPLES, committed_without_outputs, load_example, run_notebook
from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)

NOTEBOOK = EXAMPLES / "llama" / "llama_on_npu.ipynb"
TEST_TRAIN_STEPS = 60


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    build_tiny_llama = load_example("llama/build_tiny_llama.py")
    return build_tiny_llama.build(tmp_path_factory.mktemp("tiny-llama"), steps=TEST_TRAIN_STEPS)


def _check_trace(path: Path) -> list[dict]:
    data = json.loads(Path(path).read_text())
    slices = [e for e in data["traceEvents"] if e.get("ph") == "X"]
    assert slices, f"{path} has no slices"
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in slices)
    return slices


def test_quickstart(tmp_path, capsys):
    load_example("quickstart.py").main(tmp_path)
    printed = capsys.readouterr().out
    for name in ("linear", "linear_relu", "linear_atan_linear"):
        assert (tmp_path / f"{name}.rbln").is_file()
        _check_trace(tmp_path / f"{name}_trace.json")
        assert f"=== {name}:" in printed
    # atan has no device kernel: it runs on the host, between two device segments.
    host_slices = [e for e in _check_trace(tmp_path / "linear_atan_linear_trace.json") if e["cat"] == "Host"]
    assert host_slices


def test_build_tiny_llama_is_reused_and_readable(tiny_llama):
    from transformers import AutoTokenizer

    build_tiny_llama = load_example("llama/build_tiny_llama.py")
    weights = tiny_llama / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_tiny_llama.build(tiny_llama, steps=TEST_TRAIN_STEPS) == tiny_llama
    assert weights.stat().st_mtime_ns == mtime  # not retrained
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    assert tokenizer.padding_side == "left"
    ids = tokenizer("It was the best of times,").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "It was the best of times,"


def test_llama_generate_example(tiny_llama, tmp_path, capsys):
    generate = load_example("llama/generate.py")
    new_tokens = 24
    result = generate.main(model_dir=tiny_llama, out_dir=tmp_path, train_steps=TEST_TRAIN_STEPS,
                           max_new_tokens=new_tokens)
    printed = capsys.readouterr().out

    # exact numerics: token for token what transformers generates in fp32
    assert result.exact_tokens.shape == result.hf_tokens.shape == (len(generate.PROMPTS), new_tokens)
    assert result.exact_matches_hf, (result.exact_tokens, result.hf_tokens)
    assert "MATCH token for token" in printed

    assert len(result.texts) == len(generate.PROMPTS)
    assert all(text.strip() for text in result.texts)
    for prompt, text in zip(generate.PROMPTS, result.texts):
        assert f"> {prompt}" in printed and text in printed

    stats = result.stats
    assert stats.batch_size == 4 and stats.decode_bucket == 4
    assert stats.new_tokens == new_tokens and stats.decode_steps == new_tokens - 1
    assert 0 < stats.ttft_s and 0 < stats.tpot_s and stats.tokens_per_s > 0
    assert stats.memory and stats.memory[0].total_bytes > 0

    compiled = tmp_path / "compiled_llama"
    names = {p.name for p in compiled.iterdir()}
    assert {"prefill.rbln", "decoder_batch_4.rbln", "decoder_batch_1.rbln", "rbln_config.json",
            "tokenizer.json", "config.json"} <= names
    slices = _check_trace(result.trace_path)
    tracks = {e["cat"] for e in slices}
    assert {"Neural Engine Clusters", "Task DMA"} <= tracks


def test_the_demo_says_where_its_outputs_go_and_they_are_ignored_by_git():
    """The demo ends with the folders it wrote (no temporary folder left behind); each is git-ignored,
    so a newcomer's `git status` stays clean (the notebooks write to the same out/ folders)."""
    import subprocess

    demo = load_example("demo.py")
    root = EXAMPLES.parent
    assert load_example("image-classification/classify.py").OUT == EXAMPLES / "image-classification" / "out"
    notebook = json.loads((EXAMPLES / "image-classification" / "image_classification_on_npu.ipynb").read_text())
    assert any('"IMAGE_CLASSIFICATION_OUT", "out"' in "".join(cell["source"]) for cell in notebook["cells"])
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    for folder, _ in demo.OUTPUTS:
        done = subprocess.run(["git", "check-ignore", "-q", f"{folder}some_file"], cwd=root)
        assert done.returncode == 0, f"{folder} is not ignored by git"


def test_demo_runs_the_examples():
    demo = load_example("demo.py")
    assert callable(demo.load_example("quickstart.py").main)
    assert callable(demo.load_example("llama/generate.py").main)
    assert callable(demo.load_example("image-classification/classify.py").main)
    assert callable(demo.load_example("stable-diffusion/text_to_image.py").main)
    assert callable(demo.load_example("cosmos/text_to_world.py").main)


def test_notebook_is_committed_without_outputs():
    assert committed_without_outputs(NOTEBOOK)


def test_notebook_runs(tiny_llama, tmp_path, monkeypatch):
    # Read by the notebook (and its kernel process) to use the test's model and folders.
    monkeypatch.setenv("TINY_LLAMA_DIR", str(tiny_llama))
    monkeypatch.setenv("TINY_LLAMA_OUT", str(tmp_path))
    monkeypatch.setenv("TINY_LLAMA_STEPS", str(TEST_TRAIN_STEPS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is another process: same reason as above
    outputs = run_notebook(NOTEBOOK, NOTEBOOK.parent)
    assert "exact numerics == transformers fp32: True" in outputs
    assert "Runtime(RBLNLlamaForCausalLM.prefill)" in outputs  # `optimum-npu smi` saw the loaded model
    assert "No runtime holds device memory" in outputs          # ... and nothing once it was closed
    _check_trace(tmp_path / "trace.json")
    assert (tmp_path / "compiled_llama" / "prefill.rbln").is_file()


def test_cosmos_guardrail_example(tmp_path):
    result = load_example("cosmos/guardrail.py").main(tmp_path)
    assert result.verdicts == {"a robot arm lifts a red cube": True, "Two Zorblaxes walk by": False,
                               "a z-o-r-b-l-a-x on the table": False, "a green car in a city street at night": True}
    assert result.reloaded_verdicts == result.verdicts     # the reloaded (not recompiled) checker agrees
    assert "refused by the Blocklist guardrail" in result.reports["Two Zorblaxes walk by"]
    assert result.video_out.shape == result.video_in.shape and result.video_out.dtype == result.video_in.dtype
    assert result.video_report.startswith("the video passed: 3 sampled frame(s) classified safe")
    assert all(seconds > 0 for seconds in result.simulated_time_s.values())
    assert (result.compiled_folder / "rbln_config.json").is_file() and (tmp_path / "video.gif").is_file()


# ---- image classification ----------------------------------------------------------------

IMAGE_NOTEBOOK = EXAMPLES / "image-classification" / "image_classification_on_npu.ipynb"


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory) -> Path:
    return load_example("image-classification/classify.py").build(tmp_path_factory.mktemp("tiny-resnet"))


def test_image_classification_example(tiny_resnet, tmp_path, capsys):
    result = load_example("image-classification/classify.py").main(model_dir=tiny_resnet, out_dir=tmp_path)
    printed = capsys.readouterr().out
    assert result.predicted == result.hf_predicted  # the compiled model names what the HF model names
    assert "top-1 equal to the HF model's: True" in printed and "is not supported" not in printed
    stats = result.stats
    assert (stats.samples, stats.compiled_batch_size, stats.runs) == (6, 4, 2) and stats.samples_per_s > 0
    assert {p.name for p in (tmp_path / "compiled").iterdir()} == {
        "model.rbln", "rbln_config.json", "config.json", "preprocessor_config.json"}
    _check_trace(result.trace_path)
    assert result.kernels["conv2d+relu"] and result.kernels["conv2d+add+relu"]  # fused, batch norms folded
    assert not any("batch_norm" in name for name in result.kernels)


def test_image_notebook_is_committed_without_outputs_and_runs(tiny_resnet, tmp_path, monkeypatch):
    assert committed_without_outputs(IMAGE_NOTEBOOK)
    monkeypatch.setenv("IMAGE_CLASSIFICATION_MODEL_DIR", str(tiny_resnet))
    monkeypatch.setenv("IMAGE_CLASSIFICATION_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    outputs = run_notebook(IMAGE_NOTEBOOK, IMAGE_NOTEBOOK.parent)
    assert "RBLNResNetForImageClassification(graphs=['model']" in outputs
    assert "compiled for 3-channel images of 32x32" in outputs
    assert "conv2d+add+relu" in outputs
    _check_trace(tmp_path / "trace.json")
