"""Mixture-of-experts machinery (Mixtral, Qwen3-MoE; their parity tests are in test_llm_zoo.py):

- the device's MoE kernel (`rbln.moe_experts`) against transformers' own MoE block, in fp32;
- its price follows the experts the batch's tokens touch: the same number of (token, expert)
  pairs routed to 2 of 4 experts reads 2 experts' weights, spread over all 4 reads 4 (the
  figures worked out from the shapes here), and the simulated run of the compiled kernel is the
  shorter for it;
- under tensor parallelism the experts are split across devices (weights and expert ids by
  experts, partial sums all-reduced), greedy generate still token-identical to transformers.
"""

import pytest
import torch
from torch import nn

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import hf_generate, make_hf_model, random_prompts
from optimum_npu import RBLNAutoModelForCausalLM, Runtime, compile_from_torch
from optimum_npu.modeling.decoderonly.layouts import SparseMoE
from optimum_npu.sim_device.kernels import attention_cost
from test_llm_parity import rbln_generate

EXPERTS, TOP_K, HIDDEN, INTER = 4, 2, 64, 128  # the tiny Mixtral of llm_fixtures
TOKENS = 8


def mixtral_block():
    return make_hf_model("mixtral").model.layers[0].mlp


def routed_to(block, experts: list[int]) -> torch.Tensor:
    """Hidden states [TOKENS, HIDDEN] whose top-2 experts are `experts` (2 of them: all tokens pick
    the same two; 4: tokens alternate between the two pairs), from the router's own weight."""
    router = block.gate.weight.detach()  # [EXPERTS, HIDDEN]
    pairs = [experts[:2], experts[2:]] if len(experts) == 4 else [experts]
    rows = []
    for t in range(TOKENS):
        pair = pairs[t % len(pairs)]
        # least squares: logits 3 for the pair, -3 for the others, plus a little per-token noise
        target = torch.full((EXPERTS,), -3.0)
        target[pair] = torch.tensor([3.0, 2.0])
        x = torch.linalg.lstsq(router, target[:, None]).solution[:, 0]
        rows.append(x + 0.01 * torch.randn(HIDDEN, generator=torch.Generator().manual_seed(t)))
    hidden = torch.stack(rows)
    picked = torch.topk(hidden @ router.T, TOP_K, dim=-1).indices
    assert set(picked.flatten().tolist()) == set(experts)
    return hidden


def test_kernel_equals_transformers_moe_block():
    block = mixtral_block()
    moe = SparseMoE(block, "silu", renormalize=True)
    hidden = torch.randn(2, 5, HIDDEN)
    with torch.no_grad():
        assert torch.allclose(moe(hidden), block(hidden), atol=1e-6, rtol=0)
        # Qwen3-MoE's router without renormalised top-k weights
        qwen = make_hf_model("qwen3_moe").model.layers[1].mlp
        assert torch.allclose(SparseMoE(qwen, "silu", renormalize=False)(hidden), qwen(hidden), atol=1e-6, rtol=0)


def test_price_follows_the_experts_the_tokens_touch():
    block = mixtral_block()
    moe = SparseMoE(block, "silu", renormalize=True)
    weights = (block.gate.weight, moe.expert_ids, block.experts.gate_up_proj, block.experts.down_proj)
    costs = {}
    for touched in ([0, 1], [0, 1, 2, 3]):
        hidden = routed_to(block, touched)
        costs[len(touched)] = attention_cost("rbln.moe_experts.default", (hidden, *weights, TOP_K, True), float_bytes=2)
    (flops2, read2, written2), (flops4, read4, written4) = costs[2], costs[4]
    # The same pairs (8 tokens x top-2) either way: router 2*T*H*E, each pair 2*H*2I + 2*I*H.
    pairs = TOKENS * TOP_K
    assert flops2 == flops4 == 2 * TOKENS * HIDDEN * EXPERTS + pairs * (2 * HIDDEN * 2 * INTER + 2 * INTER * HIDDEN)
    # Two more experts' weights read (gate_up and down, 2 bytes each), nothing else differs.
    assert read4 - read2 == 2 * (2 * INTER * HIDDEN + HIDDEN * INTER) * 2
    assert written2 == written4 == TOKENS * HIDDEN * 2

    # The compiled kernel (device numerics: bf16) is priced per run by what its tokens route to.
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = moe

        def forward(self, x):
            return self.moe(x)

    compiled = compile_from_torch(Wrapped(), input_info=[("x", (TOKENS, HIDDEN), "float32")])
    runtime = Runtime(compiled)
    times = {}
    for touched in ([0, 1], [0, 1, 2, 3]):
        runtime.run(routed_to(block, touched))
        times[len(touched)] = runtime.stats.last_run_s
    assert times[2] < times[4]


@pytest.mark.parametrize("family", ["mixtral", pytest.param("qwen3_moe", marks=pytest.mark.heavy)])
def test_experts_split_across_devices_under_tensor_parallelism(family):
    hf = make_hf_model(family)
    sparse = [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]  # Qwen3-MoE: layer 1
    model = RBLNAutoModelForCausalLM.from_model(hf, rbln_batch_size=2, rbln_max_seq_len=256, rbln_prefill_chunk_size=64,
                                                rbln_tensor_parallel_size=2, rbln_numerics="exact")
    try:
        program = model.graphs["decoder_batch_2"].program
        shards = program.tensor_shards
        half = [[[0, EXPERTS // 2]], [[EXPERTS // 2, EXPERTS // 2]]]
        for layer in sparse:
            for part in ("experts.gate_up_proj", "experts.down_proj", "expert_ids"):
                name = f"layers.{layer}.moe.{part}"
                assert shards[name].dim == 0 and shards[name].ranges == half, name
            assert f"layers.{layer}.moe.gate.weight" not in shards  # every device routes with the whole router
        prompts = random_prompts((70, 23), seed=3)
        tokens, _ = rbln_generate(model, prompts, max_new_tokens=8, do_sample=False)
        for row, prompt in enumerate(prompts):
            assert tokens[row].tolist() == hf_generate(hf, prompt, max_new_tokens=8, do_sample=False).tolist(), row
    finally:
        model.close()


@pytest.mark.parametrize("bad", ["gelu_new"])
def test_an_activation_the_kernel_lacks_is_refused(bad):
    with pytest.raises(ValueError, match="hidden_act is 'gelu_new'"):
        SparseMoE(mixtral_block(), bad, renormalize=True)


def test_weight_quantisation_of_experts_is_refused():
    with pytest.raises(ValueError, match="does not reach a mixture of experts"):
        RBLNAutoModelForCausalLM.from_model(make_hf_model("mixtral"), rbln_batch_size=1, rbln_max_seq_len=256,
                                            rbln_prefill_chunk_size=64, rbln_create_runtimes=False,
                                            rbln_quantization={"weights": "int8"})
