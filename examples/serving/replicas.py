"""Two vLLM engines on their own simulated NPUs behind one OpenAI endpoint (Ray Serve), asked by the `openai` client.

    python examples/serving/replicas.py [--replicas 2] [--router prefix-aware] [--port 8000]

1. builds the tiny Llama of the Llama examples (examples/llama/build_tiny_llama.py; reused once built)
   and compiles it for the NPU with tensor parallelism 2 (examples/serving/tiny-llama-npu-tp2);
2. starts what a user would start, `optimum-npu serve FOLDER --replicas N`: a local Ray instance
   (loopback only) whose RBLN resources are the simulated machine's devices, N engine replicas on
   2 devices each, one endpoint on 127.0.0.1;
3. sends a few completion requests at once with the `openai` client and prints the stories;
4. stops the server (as Ctrl-C would) and waits for it to exit.

Every wait is bounded. The simulated machine has 4 devices (OPTIMUM_NPU_SYSTEM=RBLN-CA25): 2
replicas x 2 devices; for more replicas give it more cards, e.g. OPTIMUM_NPU_SYSTEM=RBLN-CA25x2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
START_TIMEOUT_S = 900   # engines start one after the other: about a minute each on two busy cores
STOP_TIMEOUT_S = 120
PROMPTS = ["Once upon a time, a little fox", "The old bear found", "One day the river", "In the tall tree lived"]


def compiled_folder(folder: Path = HERE / "tiny-llama-npu-tp2") -> Path:
    """The tiny Llama compiled with TP 2 (built and compiled on the first run)."""
    if (folder / "rbln_config.json").is_file():
        return folder
    spec = importlib.util.spec_from_file_location("build_tiny_llama", HERE.parent / "llama" / "build_tiny_llama.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    source = builder.build()
    from optimum_npu import RBLNAutoModelForCausalLM

    model = RBLNAutoModelForCausalLM.from_pretrained(str(source), export=True, rbln_batch_size=4, rbln_max_seq_len=512,
                                                     rbln_tensor_parallel_size=2, rbln_create_runtimes=False)
    model.save_pretrained(folder)
    return folder


def wait_until_up(client, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            client.models.list()
            return
        except Exception:  # not listening yet, or the application is still deploying
            time.sleep(3)
    raise SystemExit(f"the server is not up after {START_TIMEOUT_S} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--router", default="prefix-aware", choices=["round-robin", "least-loaded", "prefix-aware"])
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()

    import openai

    folder = compiled_folder()
    command = [sys.executable, "-m", "optimum_npu.cli", "serve", str(folder), "--replicas", str(args.replicas),
               "--router", args.router, "--host", "127.0.0.1", "--port", str(args.port),
               "--served-model-name", "tiny-llama", "--max-num-seqs", "4"]
    print("$", " ".join(command[2:]), flush=True)
    server = subprocess.Popen(command, start_new_session=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused", timeout=300,
                               max_retries=0)
        wait_until_up(client, server)

        def complete(prompt: str) -> str:
            done = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=32, temperature=0.0)
            return done.choices[0].text

        with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
            for prompt, story in zip(PROMPTS, pool.map(complete, PROMPTS, timeout=600)):
                print(f"{prompt}{story}\n")
    finally:
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
