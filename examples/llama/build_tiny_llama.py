"""Build the tiny Llama the Llama examples use (`optimum_npu.testing.build_tiny_llama`), offline.

    python examples/llama/build_tiny_llama.py [folder] [--steps N] [--force]

A 0.9M-parameter Llama with its own BPE tokenizer, trained for a few hundred steps on a small
embedded corpus (~40 s on one CPU thread); saved to `examples/llama/tiny-llama` by default and
reused when that folder already holds it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from optimum_npu.testing.llama import DEFAULT_STEPS
from optimum_npu.testing.llama import build_tiny_llama as _build

DEFAULT_FOLDER = Path(__file__).resolve().parent / "tiny-llama"


def build(folder: str | Path = DEFAULT_FOLDER, steps: int = DEFAULT_STEPS, force: bool = False) -> Path:
    return _build(folder, steps, force)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(DEFAULT_FOLDER))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder exists")
    args = parser.parse_args()
    build(args.folder, args.steps, args.force)


if __name__ == "__main__":
    main()
