"""All ranks in one host call (sim_device/rank_batching.py) against the op called once per rank,
as a rank alone (one process per device) calls it.

- column- and row-parallel linear: each rank's output has the bits of that rank's own
  `F.linear`, in bf16 and fp32, at decode (1 row) and prefill (64 rows) sizes, with plain and
  packed (oneDNN) weights;
- the KV cache update and both attention kernels over rank-stacked caches: the cache each rank
  holds afterwards and each rank's attention output are bit-identical to the per-rank calls,
  with padding rows, an attention mask and a partitioned (flash) cache;
- block tables outside a rank's blocks are left to the per-rank kernels (which refuse them),
  never read as another rank's blocks;
- a compiled tensor-parallel program uses these forms (so the host speed-up cannot silently go).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from optimum_npu import compile_from_torch
from optimum_npu.sim_device.kernels import FLASH_ATTENTION, IMPLEMENTATIONS, KV_CACHE_UPDATE, PAGED_ATTENTION
from optimum_npu.sim_device.executor import STACKED
from optimum_npu.sim_device.host_linear import PackedLinear, PackedWeights
from optimum_npu.sim_device.rank_batching import (
    ELEMENTWISE_OPS, SHAPE_OPS, CheckedElementwise, RowsCache, Stacked, all_rank_form, column_linear, elementwise,
    row_linear,
)

RANKS = 4


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 4, 64])   # 1 and 4 rows: one matmul for all ranks; 64: one per rank
def test_linear_over_ranks_has_each_ranks_bits(dtype, rows, packed):
    torch.manual_seed(0)
    matmul = PackedLinear(PackedWeights()) if packed else torch.ops.aten.linear.default
    x = torch.randn(1, rows, 128).to(dtype)
    column = torch.randn(RANKS, 96, 128).to(dtype)    # each rank: 96 output features
    bias = torch.randn(RANKS, 96).to(dtype)
    for _ in range(2):  # the packed linear decides on its first call, then uses its choice
        stacked = column_linear(matmul, x, Stacked(column), Stacked(bias))
        assert stacked.shape == (RANKS, 1, rows, 96)
        for r in range(RANKS):
            assert torch.equal(stacked[r], F.linear(x, column[r], bias[r]))
    parts = [torch.randn(1, rows, 32).to(dtype) for _ in range(RANKS)]   # each rank: 32 input features
    row = Stacked(torch.randn(RANKS, 128, 32).to(dtype))
    for _ in range(2):  # the first call checks the one-matmul form, later calls use the verdict
        for r, out in enumerate(row_linear(matmul, parts, row)):
            assert torch.equal(out, F.linear(parts[r], row.tensor[r]))
    stacked_parts = Stacked(torch.stack(parts))   # the same inputs held rank-stacked
    for _ in range(2):
        for r, out in enumerate(row_linear(matmul, stacked_parts, row)):
            assert torch.equal(out, F.linear(parts[r], row.tensor[r]))
    assert column_linear(matmul, x, row.tensor[0]) is None  # a weight that is not rank-stacked: called per rank
    assert row_linear(matmul, parts, row.tensor[0]) is None


def _caches(blocks: int, block_size: int, kv_heads: int = 1, head_dim: int = 16):
    stacked = [torch.randn(RANKS, blocks, kv_heads, block_size, head_dim).bfloat16() for _ in "kv"]
    per_rank = [[c[r].clone() for r in range(RANKS)] for c in stacked]
    return stacked, per_rank


@pytest.mark.parametrize("kernel", [PAGED_ATTENTION, FLASH_ATTENTION])
def test_attention_over_ranks_matches_each_rank(kernel):
    """Batch of 3: one padding row, rows at different positions, an attention mask; 2 query
    heads per rank over 1 KV head; 4 blocks of 16 per sequence (flash: one partition a block)."""
    torch.manual_seed(0)
    batch, tokens, block_size = 3, 5, 16
    (k_stack, v_stack), (k_ranks, v_ranks) = _caches(blocks=12, block_size=block_size)
    tables = torch.tensor([[0, 1, 2, 3], [7, 4, 5, 6], [8, 9, 10, 11]], dtype=torch.int32)
    start = torch.tensor([20, -1, 3], dtype=torch.int32)
    mask = torch.ones(batch, 64, dtype=torch.int32)
    mask[2, :2] = 0
    k_new = [torch.randn(batch, 1, tokens, 16).bfloat16() for _ in range(RANKS)]
    v_new = [torch.randn(batch, 1, tokens, 16).bfloat16() for _ in range(RANKS)]
    q = [torch.randn(batch, 2, tokens, 16).bfloat16() for _ in range(RANKS)]
    update = IMPLEMENTATIONS[KV_CACHE_UPDATE]
    assert all_rank_form(KV_CACHE_UPDATE, True).run(update, Stacked(k_stack), Stacked(v_stack), k_new, v_new, tables, start) is not None
    scalars = (0.25, 0) + ((block_size,) if kernel == FLASH_ATTENTION else ())
    outs = all_rank_form(kernel, True).run(IMPLEMENTATIONS[kernel], q, Stacked(k_stack), Stacked(v_stack), tables, start, *scalars,
                              attention_mask=mask)
    from_stacked = all_rank_form(kernel, True).run(IMPLEMENTATIONS[kernel], Stacked(torch.stack(q)), Stacked(k_stack),
                                                   Stacked(v_stack), tables, start, *scalars, attention_mask=mask)
    for r in range(RANKS):
        IMPLEMENTATIONS[KV_CACHE_UPDATE](k_ranks[r], v_ranks[r], k_new[r], v_new[r], tables, start)
        assert torch.equal(k_stack[r], k_ranks[r]) and torch.equal(v_stack[r], v_ranks[r])
        alone = IMPLEMENTATIONS[kernel](q[r], k_ranks[r], v_ranks[r], tables, start, *scalars, attention_mask=mask)
        assert torch.equal(outs[r], alone) and torch.equal(from_stacked[r], alone)


def test_block_tables_outside_a_ranks_blocks_are_not_read_as_another_ranks():
    (k_stack, v_stack), _ = _caches(blocks=2, block_size=16)
    tables = torch.tensor([[2]], dtype=torch.int32)   # rank 0 has blocks 0..1; block 2 is rank 1's
    start = torch.tensor([0], dtype=torch.int32)
    q = [torch.randn(1, 2, 1, 16).bfloat16() for _ in range(RANKS)]
    attend, update = IMPLEMENTATIONS[PAGED_ATTENTION], IMPLEMENTATIONS[KV_CACHE_UPDATE]
    assert all_rank_form(PAGED_ATTENTION, True).run(attend, q, Stacked(k_stack), Stacked(v_stack), tables, start, 0.25, 0) is None
    kv = [torch.randn(1, 1, 1, 16).bfloat16() for _ in range(RANKS)]
    assert all_rank_form(KV_CACHE_UPDATE, True).run(update, Stacked(k_stack), Stacked(v_stack), kv, kv, tables, start) is None
    with pytest.raises(ValueError, match="block_tables holds indices outside"):
        IMPLEMENTATIONS[PAGED_ATTENTION](q[0], k_stack[0], v_stack[0], tables, start, 0.25, 0)


def test_batch_inputs_edited_in_place_between_calls_are_read_anew():
    """The rows built from a step's block tables are reused by the step's later layers; a table
    edited in place (as a caller reusing its buffers does) must not reuse the old rows."""
    torch.manual_seed(0)
    (k_stack, v_stack), (k_ranks, v_ranks) = _caches(blocks=4, block_size=16)
    tables = torch.tensor([[0, 1]], dtype=torch.int32)
    start = torch.tensor([3], dtype=torch.int32)
    q = [torch.randn(1, 2, 1, 16).bfloat16() for _ in range(RANKS)]
    attend, rows = IMPLEMENTATIONS[PAGED_ATTENTION], RowsCache()
    for table in ([0, 1], [2, 3]):
        tables[0] = torch.tensor(table)
        outs = all_rank_form(PAGED_ATTENTION, True).run(attend, q, Stacked(k_stack), Stacked(v_stack), tables, start,
                                                        0.25, 0, rows_cache=rows)
        for r in range(RANKS):
            assert torch.equal(outs[r], attend(q[r], k_ranks[r], v_ranks[r], tables, start, 0.25, 0))


def test_a_tensor_parallel_program_runs_its_matmuls_over_all_ranks_at_once(monkeypatch):
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", "RBLN-CA25")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256, bias=False), nn.GELU(), nn.Linear(256, 64, bias=False)).eval()
    x = torch.randn(2, 8, 64)
    runtime = compile_from_torch(mlp, example_inputs=[x], tensor_parallel_size=4, numerics="exact").create_runtime()
    ops = runtime._executable.ops
    assert ops.count(column_linear) == 1 and ops.count(row_linear) == 1   # one call each for all ranks
    with torch.no_grad():
        assert (runtime(x) - mlp(x)).abs().max().item() <= 1e-5


# ---- small ops on rank-stacked activations ---------------------------------------------------------

def _ranks_alone(fn, stacked, *args, **kwargs):
    return [fn(stacked[r], *args, **kwargs) for r in range(RANKS)]


@pytest.mark.parametrize("target, call, args", [
    ("aten.view.default", torch.ops.aten.view.default, ([2, 3, 4, 2],)),
    ("aten.reshape.default", torch.ops.aten.reshape.default, ([-1, 8],)),
    ("aten.transpose.int", torch.ops.aten.transpose.int, (1, -1)),
    ("aten.slice.Tensor", torch.ops.aten.slice.Tensor, (-1, 2, 6)),
    ("aten.slice.Tensor", torch.ops.aten.slice.Tensor, (0, 1)),
    ("aten.unsqueeze.default", torch.ops.aten.unsqueeze.default, (1,)),
    ("aten.unsqueeze.default", torch.ops.aten.unsqueeze.default, (-1,)),
    ("aten.select.int", torch.ops.aten.select.int, (1, 2)),
    ("aten.split_with_sizes.default", torch.ops.aten.split_with_sizes.default, ([5, 3], -1)),
    ("aten.split.Tensor", torch.ops.aten.split.Tensor, (1,)),   # dim defaults to 0
])
def test_shape_ops_on_stacked_give_each_ranks_result(target, call, args):
    x = torch.randn(RANKS, 2, 3, 8)   # each rank: [2, 3, 8]
    stacked_args, kwargs = SHAPE_OPS[target]([x, *args], {}, RANKS)
    out = call(*stacked_args, **kwargs)
    alone = _ranks_alone(call, x, *args)
    if isinstance(out, (list, tuple)):
        for piece, pieces in zip(out, zip(*alone)):
            assert all(torch.equal(piece[r], pieces[r]) for r in range(RANKS))
    else:
        assert all(torch.equal(out[r], alone[r]) for r in range(RANKS))
    cat = torch.ops.aten.cat.default(*SHAPE_OPS["aten.cat.default"]([[x, -x], -1], {}, RANKS)[0])
    assert all(torch.equal(cat[r], torch.cat([x[r], -x[r]], -1)) for r in range(RANKS))


def test_elementwise_on_stacked_broadcasts_as_each_rank_alone():
    """A shared operand with more dimensions than a rank's slice (rotary tables against a
    per-rank row) must broadcast against the slice, not against the rank dimension."""
    per_rank = torch.randn(RANKS, 8).bfloat16()               # each rank: [8]
    shared = torch.randn(3, 1, 8).bfloat16()                   # broadcasts to [3, 1, 8]
    out = elementwise(torch.ops.aten.mul.Tensor, per_rank, shared, stacked=(0,))
    assert all(torch.equal(out[r], per_rank[r] * shared) for r in range(RANKS))
    other = torch.randn(RANKS, 5, 8).bfloat16()
    out = elementwise(torch.ops.aten.add.Tensor, per_rank, other, stacked=(0, 1))
    assert all(torch.equal(out[r], per_rank[r] + other[r]) for r in range(RANKS))
    assert "aten.silu.default" not in ELEMENTWISE_OPS   # transcendental: its bits may depend on vectorisation


def test_checked_elementwise_keeps_the_stacked_call_only_where_it_gives_each_ranks_bits():
    gate = torch.randn(RANKS, 1, 3, 100).bfloat16()   # 100 per rank: a vector loop tail on each row
    silu = CheckedElementwise()
    for _ in range(2):
        out = silu(torch.ops.aten.silu.default, gate, stacked=(0,))
        assert all(torch.equal(out[r], F.silu(gate[r])) for r in range(RANKS))
    assert len(silu.verdicts) == 1

    def depends_on_the_batch(x):   # an op whose per-element result depends on the tensor's size
        return x + x.shape[0]

    odd = CheckedElementwise()
    for _ in range(2):
        out = odd(depends_on_the_batch, gate, stacked=(0,))
        assert all(torch.equal(out[r], depends_on_the_batch(gate[r])) for r in range(RANKS))
    assert list(odd.verdicts.values()) == [False]


def test_a_tensor_parallel_decoder_runs_its_small_ops_once_for_all_ranks(monkeypatch):
    """Q/K/V split, heads reshape and rotary embedding of a TP 4 Llama run on the rank-stacked
    activations, and the outputs still match the model (exact numerics)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_npu import RBLNLlamaForCausalLM

    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", "RBLN-CA25")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128)
    hf = LlamaForCausalLM(config).eval()
    model = RBLNLlamaForCausalLM.from_model(hf, rbln_max_seq_len=128, rbln_prefill_chunk_size=64,
                                            rbln_tensor_parallel_size=4, rbln_numerics="exact")
    runtime = model.runtimes["decoder_batch_1"]
    weights = {spec.name for spec in runtime.program.weights + runtime.program.buffers}
    stacked_values = [name for name, rank in runtime._executable.slots if rank == STACKED and name not in weights]
    assert len(stacked_values) >= 10 * config.num_hidden_layers
    ids = torch.randint(0, 128, (1, 9))
    options = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **options), hf.generate(ids, **options))
    model.close()
