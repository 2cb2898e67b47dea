"""vLLM on the simulated NPU: a vLLM platform plugin that serves compiled decoder folders.

vLLM finds `register` through the `vllm.platform_plugins` entry point (pyproject.toml) in every
process it starts. vLLM's scheduler, KV-cache manager, sampler and OpenAI server do the serving;
`worker.NPUWorker` reports the compiled KV pool and `model_runner.NPUModelRunner` runs the
compiled prefill / decode graphs with vLLM's block tables:

    from vllm import LLM, SamplingParams
    llm = LLM(model="compiled_llama_folder", max_num_seqs=4)   # a folder saved by save_pretrained
    llm.generate(["Hello"], SamplingParams(temperature=0.0))

    vllm serve compiled_llama_folder        # the OpenAI server

Installed, the plugin is the platform of every vLLM engine in the environment (the simulated
devices are always there); `VLLM_PLUGINS=""` (vLLM's own switch) turns it off.
This module imports nothing heavy: vLLM calls `register` while choosing its platform.
"""

PLATFORM = "optimum_npu.vllm.platform.NPUPlatform"


def register() -> str:
    """The platform class vLLM should load (its qualified name)."""
    return PLATFORM
