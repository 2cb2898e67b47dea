"""The tensor-parallel pass on a diffusion transformer: diffusers' Cosmos transformer split over
2 / 4 devices against the diffusers module on the same weights.

The pass sees only the exported graph. Megatron's layout for a DiT block is what it should find:
Q/K/V of the self- and cross-attention column-parallel by whole heads (the per-head RMSNorm and
RoPE then run on each rank's heads), the output projections and the MLP's second linear
row-parallel (one all-reduce each), the MLP's first linear column-parallel. Heads that do not
divide over the devices leave those layers whole (the result is still exact).
"""

import pytest
import torch
from diffusers import CosmosTransformer3DModel

from optimum_npu import RBLNCosmosTransformer3DModel
from test_diffusers_cosmos import reference_resize_without_torchvision  # noqa: F401 (autouse fixture)

# Two blocks of `heads` heads of 12 (the RoPE splits a head over frames / height / width).
TINY = dict(in_channels=4, out_channels=4, attention_head_dim=12, num_layers=2, mlp_ratio=2.0, text_embed_dim=32,
            adaln_lora_dim=4, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 1.0, 1.0),
            concat_padding_mask=True, extra_pos_embed_type="learnable")
SHAPE = dict(rbln_sample_size=(2, 8, 8), rbln_max_seq_len=8)
# bf16 device numerics (weights, activations and the all-reduced partial sums rounded to bf16,
# 2^-9 relative per rounding) through two blocks: measured 0.8% of max |output| at TP 1, 2 and 4.
BF16_OUTPUT_RTOL = 0.03


@pytest.fixture(autouse=True)
def two_cards(monkeypatch):
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", "RBLN-CA25x2")


def _transformer(heads: int) -> CosmosTransformer3DModel:
    torch.manual_seed(0)
    return CosmosTransformer3DModel(num_attention_heads=heads, **TINY).eval()


def _call(model):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 8, 8, generator=generator)
    text = torch.randn(1, 8, 32, generator=generator)
    with torch.no_grad():
        return model(x, torch.tensor([0.3]), text, fps=24, padding_mask=torch.zeros(1, 1, 16, 16)).sample


def _compile(transformer, tp: int, **options):
    # compiled, never from the compile cache: the tests read the sharding plan, which a cached program does not keep
    return RBLNCosmosTransformer3DModel.from_model(transformer, **SHAPE, rbln_tensor_parallel_size=tp,
                                                   rbln_cache=False, **options)


def _plan(model):
    return model.graphs[model.graph_name].sharding_plan


@pytest.mark.parametrize("tp", [2, 4])
def test_attention_split_by_heads_matches_diffusers_exactly(tp):
    transformer = _transformer(heads=4)
    model = _compile(transformer, tp, rbln_numerics="exact")
    torch.testing.assert_close(_call(model), _call(transformer), atol=1e-5, rtol=1e-5)

    plan = _plan(model).by_name()
    for block in range(TINY["num_layers"]):
        prefix = f"transformer.transformer_blocks.{block}"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):
                entry = plan[f"{prefix}.{attn}.{proj}.weight"]
                assert (entry.style, entry.dim) == ("column", 0)
                # whole heads of 12 per rank
                assert all(length % 12 == 0 for rank in entry.shard.ranges for _, length in rank)
            assert (plan[f"{prefix}.{attn}.to_out.0.weight"].style, plan[f"{prefix}.{attn}.to_out.0.weight"].dim) \
                == ("row", 1)
            assert plan[f"{prefix}.{attn}.norm_q.weight"].style == "replicated"  # per head: shard-local
        assert plan[f"{prefix}.ff.net.0.proj.weight"].style == "column"
        assert plan[f"{prefix}.ff.net.2.weight"].style == "row"
    # Each row-parallel layer costs one all-reduce; nothing in the blocks is all-gathered: the only
    # gather allowed is of the model's output, when its split projection is worth it.
    collectives = _plan(model).collectives
    rows = sum(entry.style == "row" for entry in plan.values())
    gathers = collectives.count("all_gather")
    assert gathers <= 1 and len(collectives) == rows + gathers
    # Megatron's three per block: self-attention out, cross-attention out, MLP out.
    block_rows = [name for name, entry in plan.items() if entry.style == "row" and "transformer_blocks.0." in name
                  and ".norm" not in name]
    assert len(block_rows) == 3


def test_device_numerics_at_tp4_within_16_bit_tolerance():
    transformer = _transformer(heads=4)
    expected = _call(transformer)
    scale = expected.abs().max()
    for tp in (1, 4):
        ours = _call(_compile(transformer, tp, rbln_dtype="bfloat16"))
        worst = ((ours - expected).abs().max() / scale).item()
        assert worst <= BF16_OUTPUT_RTOL, f"TP {tp}: max error {worst:.3g} x max|output|"


@pytest.mark.parametrize("heads, tp", [(3, 2), (2, 4)])
def test_heads_that_do_not_divide_stay_exact(heads, tp):
    """3 heads over 2 devices: Q/K/V stay whole (the plan says why). 2 heads over 4 devices: each
    rank computes the head its share belongs to, the duplicate heads are gathered, not summed."""
    transformer = _transformer(heads)
    model = _compile(transformer, tp, rbln_numerics="exact")
    torch.testing.assert_close(_call(model), _call(transformer), atol=1e-5, rtol=1e-5)
    if heads % tp and tp % heads:
        plan = _plan(model).by_name()
        to_q = plan["transformer.transformer_blocks.0.attn1.to_q.weight"]
        assert to_q.style == "replicated" and f"{heads} heads of 12 do not divide over {tp} devices" in to_q.note
