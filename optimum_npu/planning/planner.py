"""`optimum_npu.plan(...)`: which configuration of a decoder-only model should I deploy?

For a model (a Hub id, a folder, a `config.json` or a transformers config), an NPU and a
workload (input and output lengths), the planner enumerates deployments (quantisation,
tensor-parallel size, batch size = decode bucket, prefill chunk, attention mode), discards those that do not
fit a device, and prices the rest with the device's cost model through a serving simulation
(`serving.simulate`: continuous batching at a concurrency of the batch size, the host's serving
work between steps included). A latency objective (`max_ttft_s`, `max_tpot_s`: bounds on the
median time to first token and time per output token) discards the deployments that break it.

It compiles on the meta device, from the config alone, and only a 1-layer and a 2-layer copy
of the model per (tensor-parallel size, attention mode, chunk): every decoder layer is the
same program, so a quantity of the whole model is `q(1) + (layers - 1) * (q(2) - q(1))`
(times at each KV length, weights, KV cache). That is what makes a 70B plan take seconds.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

from ..sim_device import power
from ..sim_device.cost_model import DEFAULT_CALIBRATION
from ..sim_device.specs import DEFAULT_NPU, get_npu_spec
from ..modeling.decoderonly.kv_cache import KVCacheLayout, is_kv_cache
from ..modeling.quantization import label as quantization_label, named as named_quantization
from .meta import CompileCache, compile_decoder_on_meta, load_hf_config
from .serving import StepTimes, closed_loop, serving_host_overhead, simulate

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
CHUNK_SIZES = (128, 512)
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8, 16, 32)
PARTITION_LEN = 4096


@dataclass
class Candidate:
    """One deployment and what the simulation says of it."""

    tensor_parallel_size: int
    batch_size: int
    quantization: str             # "16bit", "w4a16 g128", ... (`modeling.quantization.label`)
    prefill_chunk_size: int
    attn_impl: str
    kvcache_partition_len: int | None
    max_seq_len: int
    memory_per_device_bytes: int
    ttft_s: float                 # median over the simulated requests
    tpot_s: float                 # median
    tokens_per_s: float           # one instance (tensor_parallel_size devices)
    tokens_per_s_per_card: float
    tokens_per_s_per_server: float
    tokens_per_s_per_rack: float  # as many cards as the rack's power budget feeds
    tokens_per_s_per_watt: float  # over the card's simulated power (sim_device/power.py), host and server excluded
    card_watts: float             # that power: idle plus what the deployment's utilisation draws
    devices: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    model: str
    npu: str
    input_len: int
    output_len: int
    rack_power_w: float
    candidates: list[Candidate]    # feasible ones, best first (tokens/s per watt)
    rejected: list[str]            # why the others were dropped
    max_ttft_s: float | None = None   # the latency objective the candidates meet (None: unbounded)
    max_tpot_s: float | None = None

    def table(self) -> str:
        header = (f"{'#':>3} {'quant':>10} {'TP':>3} {'batch':>5} {'chunk':>5} {'attention':>16} {'mem/dev GiB':>11} {'TTFT ms':>9} "
                  f"{'TPOT ms':>8} {'tok/s inst':>10} {'tok/s card':>10} {'tok/s server':>12} {'tok/s rack':>10} "
                  f"{'tok/s/W':>7}")
        lines = [f"{self.model} on {self.npu}, input {self.input_len} / output {self.output_len} tokens; "
                 f"rack {self.rack_power_w / 1000:.1f} kW; {self.objective()}; {len(self.candidates)} feasible, "
                 f"{len(self.rejected)} rejected",
                 header, "-" * len(header)]
        for i, c in enumerate(self.candidates, 1):
            attention = _attention(c)
            lines.append(
                f"{i:>3} {c.quantization:>10} {c.tensor_parallel_size:>3} {c.batch_size:>5} {c.prefill_chunk_size:>5} {attention:>16} "
                f"{c.memory_per_device_bytes / 2**30:>11.2f} {c.ttft_s * 1e3:>9.1f} {c.tpot_s * 1e3:>8.2f} "
                f"{c.tokens_per_s:>10.1f} {c.tokens_per_s_per_card:>10.1f} {c.tokens_per_s_per_server:>12.1f} "
                f"{c.tokens_per_s_per_rack:>10.0f} {c.tokens_per_s_per_watt:>7.2f}")
        return "\n".join(lines)

    def objective(self) -> str:
        return _objective(self.max_ttft_s, self.max_tpot_s)


def _attention(c: Candidate) -> str:
    return c.attn_impl if c.kvcache_partition_len is None else f"flash p{c.kvcache_partition_len}"


def _plot_labels(candidates: list[Candidate]) -> list[str]:
    """One distinct label per deployment: its row number in `Plan.table()`, TP and batch, and the
    prefill chunk and attention when the deployments differ in them (two deployments of the same
    TP and batch must not read alike)."""
    chunks = {c.prefill_chunk_size for c in candidates}
    attentions = {_attention(c) for c in candidates}
    quantizations = {c.quantization for c in candidates}
    return [f"#{i} TP{c.tensor_parallel_size} b{c.batch_size}" + (f" c{c.prefill_chunk_size}" if len(chunks) > 1 else "")
            + (f" {_attention(c)}" if len(attentions) > 1 else "")
            + (f" {c.quantization}" if len(quantizations) > 1 else "") for i, c in enumerate(candidates, 1)]


def _objective(max_ttft_s: float | None, max_tpot_s: float | None) -> str:
    bounds = ([] if max_ttft_s is None else [f"median TTFT <= {max_ttft_s:g} s"]) + (
        [] if max_tpot_s is None else [f"median TPOT <= {max_tpot_s * 1e3:g} ms"])
    return " and ".join(bounds) if bounds else "no latency bound"


def save_plot(plan: Plan, path) -> str:
    """A PNG of throughput (tokens/s per card) against latency (TPOT), one point per deployment,
    labelled with its table row, TP size and batch (and chunk / attention where deployments differ). Drawn with Pillow (a dependency of diffusers)."""
    from pathlib import Path

    from PIL import Image, ImageDraw

    width, height, margin = 900, 600, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = [c.tpot_s * 1e3 for c in plan.candidates]
    ys = [c.tokens_per_s_per_card for c in plan.candidates]
    x_max, y_max = max(xs) * 1.1, max(ys) * 1.1

    def at(x: float, y: float) -> tuple[float, float]:
        return margin + x / x_max * (width - 2 * margin), height - margin - y / y_max * (height - 2 * margin)

    draw.line([at(0, 0), at(x_max, 0)], fill="black")
    draw.line([at(0, 0), at(0, y_max)], fill="black")
    for i in range(6):
        x, y = x_max * i / 5, y_max * i / 5
        draw.text((at(x, 0)[0] - 10, height - margin + 8), f"{x:.1f}", fill="black")
        draw.text((8, at(0, y)[1] - 6), f"{y:.0f}", fill="black")
    draw.text((width / 2 - 80, height - 25), "TPOT (ms, median)", fill="black")
    draw.text((8, 20), "tokens/s per card", fill="black")
    draw.text((width / 2 - 200, 20), f"{plan.model} on {plan.npu}, {plan.input_len} in / {plan.output_len} out",
              fill="black")
    for c, x, y, label in zip(plan.candidates, xs, ys, _plot_labels(plan.candidates)):
        px, py = at(x, y)
        color = "#1f77b4" if c.attn_impl == "eager" else "#ff7f0e"  # eager blue, flash orange
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        draw.text((px + 6, py - 6), label, fill="black")
    path = Path(path)
    image.save(path, format="PNG")
    return str(path)


def _max_seq_len(needed: int, attn_impl: str) -> int | None:
    """The smallest max_seq_len of `attn_impl` that holds `needed` positions (None: none does)."""
    if attn_impl == "eager":
        size = 1 << max(6, (needed - 1).bit_length())
        return size if size <= 32_768 else None
    size = max(2 * PARTITION_LEN, -(-needed // PARTITION_LEN) * PARTITION_LEN)
    return size


def _with_layers(hf_config, layers: int):
    config = copy.deepcopy(hf_config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:layers]
    return config


def _parameter_count(hf_config) -> int:
    """Distinct parameters of the model (a tied embedding counted once): counted on the meta device
    for a 1-layer and a 2-layer copy, then scaled to the layer count (every decoder layer has the
    same parameters), so a config of a billion layers costs what one of two does."""
    import torch
    from transformers import AutoModelForCausalLM

    counts = []
    for layers in (1, 2):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(_with_layers(hf_config, layers))
        counts.append(sum(p.numel() for p in model.parameters()))
    return int(_scaled(counts[0], counts[1], hf_config.num_hidden_layers))


# What a decoder config may say (inclusive bounds; the largest public models are far inside them).
CONFIG_RANGES = {
    "num_hidden_layers": (1, 1024), "hidden_size": (1, 131_072), "intermediate_size": (1, 1_048_576),
    "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024), "head_dim": (1, 4096),
    "vocab_size": (1, 4_194_304), "max_position_embeddings": (1, 16_777_216),
}


def check_decoder_config(hf_config) -> None:
    """ValueError naming the field and its allowed range unless the config's sizes are sane:
    positive, bounded, and the KV heads a divisor of the attention heads."""
    for name, (low, high) in CONFIG_RANGES.items():
        value = getattr(hf_config, name, None)
        if value is None and name in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            continue  # optional: defaults to the attention heads / hidden_size // heads / unbounded
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"config {name} must be an integer from {low} to {high}, got {value!r}")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(f"config num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads})")
    if getattr(hf_config, "head_dim", None) is None and hf_config.hidden_size % heads:
        raise ValueError(f"config hidden_size ({hf_config.hidden_size}) must be a multiple of num_attention_heads "
                         f"({heads}) when the config gives no head_dim")


def _scaled(one: float, two: float, layers: int) -> float:
    return one + (layers - 1) * (two - one)


class _ScaledGraph:
    """A graph of the full model priced from its 1-layer and 2-layer compilations."""

    def __init__(self, one, two, layers: int):
        self.one, self.two, self.layers = one, two, layers

    def estimate(self, kv_len: int):
        a, b = self.one.estimate(kv_len=kv_len), self.two.estimate(kv_len=kv_len)
        return dataclasses.replace(a, per_kind_s={k: _scaled(a.per_kind_s[k], b.per_kind_s[k], self.layers)
                                                  for k in a.per_kind_s},
                                   flops=_scaled(a.flops, b.flops, self.layers),
                                   dram_bytes=_scaled(a.dram_bytes, b.dram_bytes, self.layers))


def _card_watts(spec, graphs: dict, served, batch: int, input_len: int, output_len: int) -> float:
    """Average power of a card serving as `served` did (power.card_watts): each device's FLOPs and
    DRAM bytes over the run's wall time. The work of the run's decode steps is priced at the batch's
    bucket and the mean context of a request's decode (input_len + output_len / 2), its prefill chunks
    at half the prompt: attention is linear in the context, so the means price the totals."""
    decode = graphs[f"decoder_batch_{batch}"].estimate(kv_len=input_len + output_len // 2)
    prefill = graphs["prefill"].estimate(kv_len=max(1, input_len // 2))
    flops = served.decode_steps * decode.flops + served.prefill_chunks * prefill.flops
    nbytes = served.decode_steps * decode.dram_bytes + served.prefill_chunks * prefill.dram_bytes
    return power.card_watts(spec, *power.utilisation(spec, flops, nbytes, served.makespan_s))


def _device_bytes(one: dict, two: dict, layers: int, num_blocks: int, batch: int) -> int:
    """DRAM of the largest device of the deployment serving `batch` sequences, from the 1-layer and
    2-layer graphs compiled for the largest batch: its graphs (prefill and the decode buckets up to
    `batch`) with a KV pool of `num_blocks` blocks. Weights and buffers are per-layer tensors (each
    rank's shard in whole pages, counted by `resident_bytes` as the memory plan counts them), so they
    scale with the layers, byte for byte. The activation arena holds about one layer's values at a
    time: it is the 2-layer program's (a lone layer's is smaller; the compiler's greedy placement may
    settle a few of one layer's values higher after 2-3 layers: +65 KB of 0.4 MB on a tiny Llama)."""
    most = 0
    for name, graph in two.items():
        if graph.program.inputs[0].shape[0] > batch:  # a decode bucket larger than this deployment's batch
            continue
        for rank in range(graph.program.memory.num_devices):
            resident = _scaled(_resident_bytes(one[name].program, rank, num_blocks),
                               _resident_bytes(graph.program, rank, num_blocks), layers)
            arena = (one[name] if layers == 1 else graph).program.memory.activations_bytes[rank]
            most = max(most, int(resident) + arena)
    return most


def _resident_bytes(program, rank: int, num_blocks: int) -> int:
    """Weights and buffers of `program` on rank `rank`, its KV caches resized to `num_blocks` blocks."""
    from ..sim_device.program import TensorSpec, resident_bytes

    spec = get_npu_spec(program.npu)
    caches = [b for b in program.buffers if is_kv_cache(b.name)]
    resized = [TensorSpec(b.name, (num_blocks, *b.shape[1:]), b.dtype) for b in caches]  # blocks lead
    compiled = sum(program.resident_bytes(b, rank) for b in caches)
    wanted = sum(resident_bytes(b, program.tensor_shards.get(b.name), rank, spec) for b in resized)
    return program.memory.weights_bytes[rank] + program.memory.buffers_bytes[rank] - compiled + wanted


def plan(model, npu: str = DEFAULT_NPU, input_len: int = 2048, output_len: int = 2048, *,
         tensor_parallel_sizes=TENSOR_PARALLEL_SIZES, batch_sizes=BATCH_SIZES, chunk_sizes=CHUNK_SIZES,
         rack_power_w: float = 35_000.0, dtype: str = "bfloat16", max_ttft_s: float | None = None,
         max_tpot_s: float | None = None, quantizations=("16bit",)) -> Plan:
    """Rank the deployments of `model` on `npu` for requests of `input_len` prompt and
    `output_len` generated tokens, keeping those whose median TTFT / TPOT are within
    `max_ttft_s` / `max_tpot_s` (None: unbounded); see the module docstring. `quantizations`:
    the low-precision settings to weigh against each other, each a name ("16bit", "w8a16",
    "w4a16", "fp8", "kv-fp8", ...: `modeling.quantization.NAMED`) or an rbln_quantization dict."""
    spec = get_npu_spec(npu)
    for name, value in (("max_ttft_s", max_ttft_s), ("max_tpot_s", max_tpot_s)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
    for name, value in (("input_len", input_len), ("output_len", output_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, values in (("tensor_parallel_sizes", tensor_parallel_sizes), ("batch_sizes", batch_sizes),
                         ("chunk_sizes", chunk_sizes)):
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ValueError(f"{name} must be a non-empty list of positive ints, got {values!r}")
    if isinstance(rack_power_w, bool) or not isinstance(rack_power_w, (int, float)) or not (
            spec.card_tdp_watts <= rack_power_w <= 1e9):
        raise ValueError(f"rack_power_w (optimum-npu plan --rack-power-kw, in kW) must be a number of watts from "
                         f"{spec.card_tdp_watts:g} (one {npu} card) to 1e9, got {rack_power_w!r}")
    batch_sizes = tuple(sorted(set(batch_sizes)))
    if isinstance(quantizations, (str, dict)) or not quantizations:
        raise ValueError(f"quantizations must be a non-empty list of names or rbln_quantization dicts, got "
                         f"{quantizations!r}")
    quantizations = list({quantization_label(q): q for q in map(named_quantization, quantizations)}.values())
    hf_config = load_hf_config(model)
    check_decoder_config(hf_config)
    name = model if isinstance(model, str) else (getattr(hf_config, "_name_or_path", "") or hf_config.model_type)
    layers = hf_config.num_hidden_layers
    limit = getattr(hf_config, "max_position_embeddings", None)
    needed = input_len + output_len
    if limit is not None and needed > limit:
        raise ValueError(f"input_len + output_len = {needed} is longer than the model's max_position_embeddings "
                         f"({limit}): no max_seq_len can serve it")
    parameters = _parameter_count(hf_config)
    host = serving_host_overhead(hf_config.vocab_size, DEFAULT_CALIBRATION.host_bandwidth)
    candidates, rejected = [], []
    one_layer, two_layers = _with_layers(hf_config, 1), _with_layers(hf_config, 2)
    cache = CompileCache()  # each distinct graph exported once, compiled once per tensor-parallel size
    for quantization in quantizations:
        # a lower bound of the weights' bytes: every parameter at the quantised width (no scales)
        weight_bytes = parameters * (16 if quantization is None else quantization.weight_bits) / 8
        quant = quantization_label(quantization)
        for attn_impl in ("eager", "flash_attn"):
            max_seq_len = _max_seq_len(needed, attn_impl)
            if max_seq_len is None or (limit is not None and max_seq_len > limit):
                rejected.append(f"{attn_impl}: no max_seq_len of this attention mode holds {needed} positions within "
                                f"the model's {limit}")
                continue
            for tp in tensor_parallel_sizes:
                if weight_bytes / tp > spec.usable_dram_bytes:
                    rejected.append(f"{quant}, TP {tp}, {attn_impl}: the weights alone need at least "
                                    f"{weight_bytes / tp / 2**30:.1f} GiB per device, "
                                    f"{spec.usable_dram_bytes / 2**30:.1f} usable")
                    continue
                for chunk in chunk_sizes:
                    options = dict(rbln_npu=npu, rbln_dtype=dtype, rbln_tensor_parallel_size=tp,
                                   rbln_batch_size=max(batch_sizes), rbln_decoder_batch_sizes=list(batch_sizes),
                                   rbln_max_seq_len=max_seq_len, rbln_prefill_chunk_size=chunk,
                                   rbln_attn_impl=attn_impl)
                    if attn_impl == "flash_attn":
                        options["rbln_kvcache_partition_len"] = PARTITION_LEN
                    if quantization is not None:
                        options["rbln_quantization"] = quantization.to_json()
                    try:
                        # The pool: every slot at full length (the config's default).
                        config, one = compile_decoder_on_meta(one_layer, check_memory=False, cache=cache, **options)
                        _, two = compile_decoder_on_meta(two_layers, check_memory=False, cache=cache, **options)
                    except ValueError as error:
                        rejected.append(f"{quant}, TP {tp}, chunk {chunk}, {attn_impl}: {str(error).splitlines()[0]}")
                        continue
                    layout = KVCacheLayout.from_config(one_layer, config)
                    graphs = {name: _ScaledGraph(one[name], two[name], layers) for name in one}
                    times = StepTimes.from_graphs(graphs, chunk, max_seq_len, grid=max(256, max_seq_len // 16))
                    for batch in batch_sizes:
                        num_blocks = batch * layout.max_blocks_per_seq
                        memory = _device_bytes(one, two, layers, num_blocks, batch)
                        what = f"{quant}, TP {tp}, batch {batch}, chunk {chunk}, {attn_impl}"
                        if memory > spec.usable_dram_bytes:
                            rejected.append(f"{what}: needs {memory / 2**30:.1f} GiB per device, "
                                            f"{spec.usable_dram_bytes / 2**30:.1f} usable")
                            continue
                        served = simulate(times, closed_loop(batch, 2 * batch, input_len, output_len),
                                          buckets=[b for b in batch_sizes if b <= batch], host=host)
                        ttft, tpot = served.percentile("ttft_s", 50), served.percentile("tpot_s", 50)
                        if ((max_ttft_s is not None and ttft > max_ttft_s)
                                or (max_tpot_s is not None and tpot > max_tpot_s)):
                            rejected.append(f"{what}: median TTFT {ttft:.2f} s, TPOT {tpot * 1e3:.1f} ms break the "
                                            f"objective ({_objective(max_ttft_s, max_tpot_s)})")
                            continue
                        rate = served.output_tokens_per_s
                        per_card = rate * spec.devices_per_card / tp
                        watts = _card_watts(spec, graphs, served, batch, input_len, output_len)
                        cards_in_rack = int(rack_power_w // spec.card_tdp_watts)
                        candidates.append(Candidate(
                            tensor_parallel_size=tp, batch_size=batch, quantization=quant, prefill_chunk_size=chunk,
                            attn_impl=attn_impl,
                            kvcache_partition_len=PARTITION_LEN if attn_impl == "flash_attn" else None,
                            max_seq_len=max_seq_len, memory_per_device_bytes=memory,
                            ttft_s=ttft, tpot_s=tpot,
                            tokens_per_s=rate, tokens_per_s_per_card=per_card,
                            tokens_per_s_per_server=per_card * spec.cards_per_server,
                            tokens_per_s_per_rack=per_card * cards_in_rack,
                            tokens_per_s_per_watt=per_card / watts, card_watts=watts, devices=tp,
                        ))
    if not candidates:
        reasons = "; ".join(rejected[-4:] if max_ttft_s or max_tpot_s else rejected[:4])
        raise ValueError(f"no deployment of {name} fits {npu} for {input_len} + {output_len} tokens: {reasons}")
    candidates.sort(key=lambda c: (-c.tokens_per_s_per_watt, c.tpot_s))
    return Plan(str(name), npu, input_len, output_len, rack_power_w, candidates, rejected, max_ttft_s, max_tpot_s)
