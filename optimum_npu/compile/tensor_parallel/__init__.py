"""Tensor parallelism: split a graph over N devices, Megatron style, from the graph alone.

The pass walks the exported graph once, in program order, tracking for every value how it is
laid out over the ranks, in PyTorch DTensor's words its placement: `Shard(dim, ranges)` (a
dimension and, per rank, the index ranges of it the rank holds), `Replicate()`, or `Partial()`
(a partial sum still to be reduced). A linear layer whose input is
replicated becomes column-parallel (its output split by features); one whose input is split
along its features becomes row-parallel (its output a partial sum, followed by an all-reduce).
Every other op either carries the layout through (views, transposes, element-wise math,
norms over unsplit dimensions, the attention kernels per head), or, when it cannot, gets its
split inputs all-gathered first. So any graph is split correctly; a transformer block is split
the way Megatron-LM / gpt-fast `tp.py` / nano-vllm split it:

- Q/K/V (fused into one matmul by the decoder) and gate/up: column-parallel. The split sizes
  of a fused projection are read from the `split` / `chunk` that follows it in the graph, and
  the head size from the `reshape` into heads, so each rank gets whole heads of every part
  (vLLM's `QKVParallelLinear`). KV heads are split when the device count divides them and
  shared (each rank holds the one KV head its query heads use) when there are fewer KV heads
  than devices; other sizes leave the layer replicated.
- the output projection and down projection: row-parallel, then an all-reduce, which the pass
  fuses with the residual add that follows (`rbln.all_reduce(x, residual)`).
- the paged KV cache: split by KV heads like the K/V it stores.
- the LM head: split by vocabulary, logits all-gathered.
- the token embedding, tied to the LM head or not: split by vocabulary, 1/N of the table per
  device; each rank looks up the ids of its slice (zero rows for the others) and the rows are
  all-reduced, as Megatron-LM's `VocabParallelEmbedding` does. A small table (no more rows than
  columns: positions, relative-position buckets) stays whole.
- a column split whose output would be all-gathered (no row-parallel layer takes it) is kept
  only where its weights outweigh the gathered activation: an LM head over a few positions
  is split by vocabulary, a patch embedding or a final projection over many tokens is not.
- norms and everything on the residual stream: replicated.

The result is the program one device runs (values in local shapes) plus `tensor_shards`, and
a `ShardingPlan` you can print. Nothing here knows a model: it reads ops and shapes.

The package: `placement.py` (Shard / Replicate / Partial and range arithmetic), `rules.py`
(one rule per op family), `splitter.py` (the walk, gathers, residual fusion, the keep-whole
fixed point, `split_graph`), `plan.py` (the printable plan).
"""

from .placement import PARTIAL, REPLICATE, Partial, Placement, Replicate, Shard
from .plan import ShardingPlan, TensorPlan
from .splitter import plan_tensor_parallel, resident_bytes_per_rank, split_graph

__all__ = [
    "PARTIAL", "Partial", "Placement", "REPLICATE", "Replicate", "Shard", "ShardingPlan", "TensorPlan",
    "plan_tensor_parallel", "resident_bytes_per_rank", "split_graph",
]
