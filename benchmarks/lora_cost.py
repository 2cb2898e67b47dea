"""What compiled-in LoRA adapters cost a decode step: Llama-3-8B shapes, compiled on the meta device.

Four adapters of rank 16 (on q/k/v/o, then on every projection) against the base model, at
batch 1 and 8, attention priced at 2048 KV positions. The 8B model in bf16 does not fit one
ATOM device and LoRA compiles for one device only, so the target is RBLN-CR03 (REBEL, 144 GB).
Prints the simulated decode step, its ratio to the base model's, the kernels per step and the
adapters' FLOPs and weight bytes (what the low-rank matmuls alone would cost).

    python benchmarks/lora_cost.py        # ~1-3 min: six meta compiles of the 8B decoder
"""

from __future__ import annotations

from model_shapes import llama3_config

from optimum_npu import RBLNLoRAAdapterConfig, RBLNLoRAConfig
from optimum_npu.planning.meta import compile_decoder_on_meta
from optimum_npu.sim_device.cost_model import CostModel, estimate_run
from optimum_npu.sim_device.specs import get_npu_spec

NPU, RANK, ADAPTERS, KV_LEN = "RBLN-CR03", 16, 4, 2048
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EVERY = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


def adapters(targets: list[str]) -> RBLNLoRAConfig:
    """Resolved adapters (rank, alpha, targets given): the meta compile reads no adapter folder."""
    return RBLNLoRAConfig(adapters=[RBLNLoRAAdapterConfig(i, f"adapter{i}", "unused", r=RANK, lora_alpha=2 * RANK,
                                                          target_modules=targets, use_rslora=False)
                                    for i in range(1, ADAPTERS + 1)])


def main() -> None:
    hf = llama3_config("8b")
    cost = CostModel(get_npu_spec(NPU))
    print(f"Llama-3-8B shapes on {NPU}, {ADAPTERS} adapters of rank {RANK}, KV length {KV_LEN}")
    for batch in (1, 8):
        base = None
        for label, lora in (("base model", None), ("q/k/v/o", adapters(ATTENTION)), ("all 7", adapters(EVERY))):
            _, graphs = compile_decoder_on_meta(hf, check_memory=False, rbln_npu=NPU, rbln_batch_size=batch,
                                                rbln_max_seq_len=4096, rbln_lora_config=lora)
            program = graphs[f"decoder_batch_{batch}"].program
            step_s = estimate_run(program, cost, kv_len=KV_LEN).total_s
            flops = sum(s.flops for s in program.steps)
            base = base or (step_s, len(program.steps), flops, program.memory.weights_bytes[0])
            print(f"  batch {batch} {label:10s}: decode step {step_s * 1e3:7.3f} ms ({step_s / base[0]:.2f}x), "
                  f"{len(program.steps):5d} kernels (+{len(program.steps) - base[1]}), FLOPs +{flops - base[2]:.3g}, "
                  f"weights +{(program.memory.weights_bytes[0] - base[3]) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
