"""Every ```python block of README.md runs as written (so the README and the code cannot drift apart).

Each block runs in a fresh interpreter, in its own empty folder, offline (HF_HUB_OFFLINE=1). A
block that names a Hub model loads a tiny random stand-in instead: every quoted Hub id in
`STAND_INS` is replaced by the folder its builder writes, a model of the same family that takes
the options the block passes (the Llama blocks ask for max_seq_len 8192, so their stand-in has
8192 positions). Nothing else in a block is changed. A Hub id in a block that is not in
`STAND_INS` fails the test: add a stand-in for it.

A block that cannot run here (none today) is marked in README.md by the line
`<!-- readme-test: skip REASON -->` right before its fence; the test is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_npu.testing import build_tiny_image_classifier, build_tiny_random_llama
from optimum_npu.testing.seq2seq import build_tiny_t5, build_tiny_whisper

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# Hub id -> builder of a tiny local folder standing in for it (called with the folder to write).
STAND_INS = {
    "meta-llama/Llama-3.1-8B": lambda folder: build_tiny_random_llama(folder, max_position_embeddings=8192),
    "microsoft/resnet-50": build_tiny_image_classifier,
    "google-t5/t5-small": build_tiny_t5,
    "openai/whisper-tiny": build_tiny_whisper,
}
SKIP_MARK = re.compile(r"<!-- readme-test: skip (.+?) -->\s*$")
# A quoted "owner/name" string: what a Hub id looks like (file names such as "trace.json" have no slash).
HUB_ID = re.compile(r"""["']([A-Za-z0-9][\w.-]*/[\w.-]+)["']""")


def python_blocks() -> list[tuple[str, int, str, str | None]]:
    """(the section heading, line number, code, skip reason or None) of every ```python block."""
    lines = README.read_text().splitlines()
    blocks, heading, i = [], "top", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") and not line.startswith("#!"):
            heading = line.lstrip("#").strip()
        if line.strip() == "```python":
            start, code = i + 1, []
            mark = SKIP_MARK.match(lines[i - 1].strip()) if i else None
            i += 1
            while lines[i].strip() != "```":
                code.append(lines[i])
                i += 1
            blocks.append((heading, start + 1, "\n".join(code) + "\n", mark.group(1) if mark else None))
        i += 1
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_the_blocks_this_test_expects():
    assert len(BLOCKS) >= 6
    used = {m.group(1) for _, _, code, _ in BLOCKS for m in HUB_ID.finditer(code)}
    assert set(STAND_INS) <= used, f"stand-ins no block uses: {set(STAND_INS) - used}"


@pytest.mark.parametrize("heading, line, code, skip", BLOCKS, ids=[f"L{b[1]}-{b[0][:30]}" for b in BLOCKS])
def test_readme_block_runs_as_written(heading, line, code, skip, tmp_path):
    if skip:
        pytest.skip(f"README.md line {line} is marked not runnable: {skip}")
    work = tmp_path / "work"
    work.mkdir()
    for hub_id in sorted({m.group(1) for m in HUB_ID.finditer(code)}):
        if hub_id not in STAND_INS:
            pytest.fail(f"README.md line {line}: no stand-in for the Hub id {hub_id!r}; add one to STAND_INS")
        folder = STAND_INS[hub_id](tmp_path / "stand-ins" / hub_id.replace("/", "--"))
        code = code.replace(f'"{hub_id}"', repr(str(folder))).replace(f"'{hub_id}'", repr(str(folder)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (
        f"README.md block at line {line} ({heading}) failed:\n{done.stderr[-4000:]}"
    )
