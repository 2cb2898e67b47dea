"""`make demo`: the compiler on three tiny modules, a Llama generating text, a ResNet
classifying images, then Stable Diffusion and a guarded Cosmos text-to-world pipeline, all on
the simulated NPU.

Run: `make demo` (or `python examples/demo.py` inside the venv). Part 1 is `quickstart.py`;
part 2 is `llama/generate.py` (trains a tiny Llama the first time, ~1 min, then reuses it);
part 3 is `image-classification/classify.py` (trains a tiny ResNet for a few seconds); parts
4 and 5 are `stable-diffusion/text_to_image.py` and `cosmos/text_to_world.py` (tiny random
components built locally; ~10 s each).
"""

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_example(relative_path: str):
    """Import an example script by its path (examples/ is not a package)."""
    path = HERE / relative_path
    name = f"example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    if not sys.stderr.isatty():
        # In a log file, transformers' and the Hub's per-file progress bars are lines of redraws and
        # escape codes; our compiles write one line each there (optimum_npu/compile/progress.py).
        import huggingface_hub
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
    print("=" * 30, "1. compile and run torch modules (examples/quickstart.py)", "=" * 30)
    load_example("quickstart.py").main()
    print("\n" + "=" * 30, "2. a Llama on the simulated NPU (examples/llama/generate.py)", "=" * 30)
    load_example("llama/generate.py").main()
    print("\n" + "=" * 30, "3. image classification (examples/image-classification/classify.py)", "=" * 30)
    load_example("image-classification/classify.py").main()
    print("\n" + "=" * 30, "4. Stable Diffusion (examples/stable-diffusion/text_to_image.py)", "=" * 30)
    load_example("stable-diffusion/text_to_image.py").main()
    print("\n" + "=" * 30, "5. Cosmos text-to-world with its guardrail (examples/cosmos/text_to_world.py)", "=" * 30)
    load_example("cosmos/text_to_world.py").main()
    print("\n" + "=" * 30, "outputs", "=" * 30)
    for where, what in OUTPUTS:
        print(f"  {where:<36} {what}")
    print("The PNG and GIF files are noise: the tiny diffusion components have random weights (the code paths are "
          "real). Open a trace.json at https://ui.perfetto.dev.")


# Where each part writes (all git-ignored; each part reuses its folder on the next run).
OUTPUTS = [
    ("quickstart_out/", "compiled .rbln files and traces of the three modules"),
    ("examples/llama/tiny-llama/", "the trained tiny Llama (reused)"),
    ("examples/llama/out/", "compiled_llama/, trace.json"),
    ("examples/image-classification/out/", "tiny-resnet/, compiled/, trace.json"),
    ("examples/stable-diffusion/out/", "text_to_image.png, image_to_image.png, compiled-sd/"),
    ("examples/cosmos/out/world/", "text_to_world.gif, video_to_world.gif, checkpoints"),
]


if __name__ == "__main__":
    main()
