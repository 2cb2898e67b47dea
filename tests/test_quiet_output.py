"""What a newcomer's stderr shows when it is not a terminal (a log, CI, a pipe): one line per compile,
no progress-bar redraws or escape codes, and none of the notices the tiny builders and the
guardrail's SigLIP load used to print (a load report of the unused text tower, bos / eos outside the
vocabulary, torchvision fallbacks). Run in a fresh interpreter with stderr piped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stderr_of(code: str, cwd) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    prelude = "from transformers.utils import logging; logging.disable_progress_bar()  # transformers' own bars\n"
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_one_line_per_compile_when_stderr_is_not_a_terminal(tmp_path):
    err = stderr_of("""
        import torch
        from optimum_npu import RBLNLlamaForCausalLM, compile_from_torch
        from optimum_npu.testing import build_tiny_random_llama
        compile_from_torch(torch.nn.Linear(16, 16), example_inputs=[torch.randn(16, 16)])
        RBLNLlamaForCausalLM.from_pretrained(build_tiny_random_llama("llama", max_position_embeddings=128),
                                             export=True, rbln_max_seq_len=128)
    """, tmp_path)
    assert "\r" not in err and "\x1b" not in err, err
    lines = err.splitlines()
    assert len(lines) == 2, err   # the decoder's graphs and its memory probe: one line for the model
    assert re.fullmatch(r"Compiling Linear: 7 passes in \d+\.\d s", lines[0]), lines[0]
    assert re.fullmatch(r"Compiling RBLNLlamaForCausalLM: 2 graphs in \d+\.\d s", lines[1]), lines[1]


def test_the_guardrail_builders_and_the_siglip_load_are_quiet(tmp_path):
    err = stderr_of("""
        from optimum_npu import RBLNSiglipVisionModel, RBLNStableDiffusionPipeline
        from optimum_npu.testing import build_tiny_siglip
        RBLNSiglipVisionModel.from_pretrained(build_tiny_siglip("siglip"), export=True)
    """, tmp_path)
    for notice in ("LOAD REPORT", "UNEXPECTED", "within the vocabulary", "requires torchvision"):
        assert notice not in err, err
    assert [line for line in err.splitlines() if not line.startswith("Compiling ")] == [], err
