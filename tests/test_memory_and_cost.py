"""Device memory (compile-time sizing on the meta device, runtime allocation accounting)
and the cost model, checked against figures computed here from the hardware's published
numbers (docs/hardware.md: an ATOM die has 256 GB/s DRAM bandwidth, 32 TFLOPS bf16/fp16, 16,877,879,296
bytes of usable DRAM as an RBLN-CA22 reports it; an ATOM-Max card talks to the host over PCIe Gen5 x16 at 64 GB/s) and the
calibration constants of `optimum_npu.sim_device.cost_model.Calibration`.
"""

import json
import re
import resource
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import optimum_npu
from optimum_npu import DeviceMemoryError, Runtime, compile_from_torch
from optimum_npu.sim_device import memory as device_memory
from optimum_npu.sim_device.cost_model import Calibration
from shared_modules import PreNormBlock, load_trace

GiB = 1024**3
ATOM_DRAM_BW = 256e9          # bytes/s per device
ATOM_PEAK_16BIT = 32e12       # FLOP/s per device
ATOM_USABLE_BYTES = 16_877_879_296  # what an RBLN-CA22 reports: 16 GiB less 288 MiB of system DRAM
PCIE_GEN5_X16 = 64e9          # bytes/s per direction
CAL = Calibration()
US = 1e-6


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A device-memory registry of this test only (other tests' runtimes may still be alive)."""
    path = tmp_path / "state"
    monkeypatch.setenv("OPTIMUM_NPU_STATE_DIR", str(path))
    return path


def n_params(module):
    return sum(p.numel() for p in module.parameters())


class WithHostOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.atan(self.a(x)))


# --------------------------------------------------------------------------- 4. meta-device compile


def test_meta_compile_sizes_weights_in_bf16():
    with torch.device("meta"):
        module = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])
    compiled = compile_from_torch(module, example_inputs=[torch.randn(8, 1024)])
    weights = 2 * n_params(module)  # bf16: 2 bytes per parameter
    assert compiled.program.memory.weights_bytes == [weights]
    # On top of the weights only activations: the fp32 input, a couple of bf16 [8, 1024] values.
    assert weights <= compiled.device_bytes <= weights + 8 * 1024 * (4 + 2 * 2) + 4096
    assert compiled.tensors is None
    with pytest.raises(ValueError, match="meta device"):
        Runtime(compiled)


def test_weights_take_whole_dram_pages_from_a_page_on():
    """The allocator's 2 MiB pages (docs/performance-model.md): a weight of a page or more takes
    whole pages, a smaller one its exact size (packed); the runtime allocates what the plan says."""
    page = 2 * 1024**2
    module = nn.Linear(1025, 1024)  # weight 1024 * 1025 * 2 bytes: just over a page; bias 2 KiB
    assert 2 * module.weight.numel() == page + 2048
    compiled = compile_from_torch(module, example_inputs=[torch.randn(2, 1025)])
    assert compiled.program.memory.weights_bytes == [2 * page + 2 * 1024]
    runtime = Runtime(compiled)
    try:
        assert runtime.stats.memory[0].weights_bytes == 2 * page + 2 * 1024
    finally:
        runtime.close()


def test_meta_compile_agrees_with_real_compile():
    def build():
        return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.LayerNorm(256))

    real = compile_from_torch(build(), example_inputs=[torch.randn(4, 256)])
    with torch.device("meta"):
        meta_module = build()
    meta = compile_from_torch(meta_module, input_info=[("input", [4, 256], "float32")])
    assert meta.device_bytes == real.device_bytes
    assert meta.estimated_latency_s == real.estimated_latency_s
    assert meta.program.to_json() == real.program.to_json()


def _huge_meta_model():
    # 40 x 16384 x 16384 bf16 weights = 40 x 0.5 GiB = 20 GiB; never materialised.
    with torch.device("meta"):
        return nn.Sequential(*[nn.Linear(16384, 16384, bias=False) for _ in range(40)])


def _seven_b_wide(layers: int):
    """Mistral-7B's widths (hidden 4096, 32 heads over 8 KV heads, MLP 14336, vocab 32000) as a Llama."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768)


@pytest.mark.heavy  # the whole 7B model on the meta device: ~2 min per compilation on a busy 2-core machine
def test_auto_sized_flash_kv_pool_is_the_most_blocks_that_fit():
    """Flash attention with no rbln_kvcache_num_blocks: the pool takes the device memory left after the
    weights, other buffers and activations, each K / V cache tensor in whole DRAM pages. At TP 8 each
    rank's K or V cache holds one KV head, 1 MiB per 4096-token block: half a page, so the pages matter.
    The pool must fit, and one block more must not (nor be left on the table)."""
    from optimum_npu.planning.meta import compile_decoder_on_meta

    config, batch = _seven_b_wide(32), 32
    options = dict(rbln_npu="RBLN-CA25", rbln_tensor_parallel_size=8, rbln_batch_size=batch, rbln_max_seq_len=32768,
                   rbln_attn_impl="flash_attn", rbln_kvcache_partition_len=4096)
    rbln_config, graphs = compile_decoder_on_meta(config, **options)
    blocks = rbln_config.kvcache_num_blocks
    assert blocks < batch * 32768 // 4096  # the pool binds: fewer blocks than every slot at full length
    usable = optimum_npu.sim_device.specs.get_npu_spec("RBLN-CA25").usable_dram_bytes
    assert graphs["prefill"].device_bytes <= usable
    with pytest.raises(DeviceMemoryError, match=f"rbln_kvcache_num_blocks={blocks + 1} blocks"):
        compile_decoder_on_meta(config, rbln_kvcache_num_blocks=blocks + 1, **options)


@pytest.mark.parametrize("per_tensor_block, tensors", [(768 * 1024, 64), (3 * 2**20 // 2, 36), (5 * 2**20, 8), (2**20, 2)])
def test_kv_pool_counts_each_cache_tensor_in_whole_dram_pages(per_tensor_block, tensors):
    """The fast form of the test above: the KV pool's size against the allocation rule Rebellions' own
    estimators use (every K / V cache tensor of a page or more takes whole 2 MiB pages, `align_2MB`),
    counted here by brute force over block counts, not by the closed form under test. A pool sized by
    the bytes alone (ignoring the page slack) is larger than the rule allows in most of these cases."""
    from optimum_npu.modeling.decoderonly.compile_plan import MemoryProbe

    page, fixed = 2 * 2**20, 3 * GiB + 12345
    for free in (10 * 2**20, 333 * 2**20 + 7, 2 * GiB + 2**20 + 5, 5 * GiB):
        usable = fixed + free

        def fits(blocks: int) -> bool:
            size = blocks * per_tensor_block
            return fixed + tensors * (size if size < page else -(-size // page) * page) <= usable

        expected = 0
        while fits(expected + 1):
            expected += 1
        probe = MemoryProbe(weights_bytes=fixed, cache_bytes=0, block_bytes=per_tensor_block * tensors, fixed_bytes=fixed,
                            activations_bytes=0, cache_tensors=tensors, page_bytes=page)
        assert probe.blocks_that_fit(usable) == expected, (per_tensor_block, tensors, free)


def test_huge_model_does_not_fit_one_atom():
    module = _huge_meta_model()
    assert 2 * n_params(module) == 20 * GiB
    with pytest.raises(DeviceMemoryError) as info:
        compile_from_torch(module, input_info=[("x", [1, 16384], "bfloat16")])
    message = str(info.value)
    assert "20.00 GiB" in message                       # needed
    assert f"{ATOM_USABLE_BYTES / GiB:.2f} GiB" in message      # available on one RBLN-CA25 device
    assert "tensor_parallel_size" in message and "RBLN-CR03" in message  # what to do


def test_huge_model_compiles_for_rebel_without_host_memory():
    module = _huge_meta_model()
    peak_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    compiled = compile_from_torch(module, input_info=[("x", [1, 16384], "bfloat16")], npu="RBLN-CR03")
    peak_growth_gib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before_kib) / 2**20
    assert 20 * GiB <= compiled.device_bytes <= 20 * GiB + 2**20
    assert compiled.program.npu == "RBLN-CR03"
    # Weights are never materialised (20 GiB in bf16, 40 in fp32): the process peak barely moves.
    assert peak_growth_gib < 1.0, f"host peak grew by {peak_growth_gib:.2f} GiB"
    assert "RBLN-CR03" in compiled.summary()


# --------------------------------------------------------------------------- 5. runtime memory


@pytest.mark.parametrize("dtype,numerics", [("bfloat16", "device"), ("float16", "device"), ("bfloat16", "exact")])
def test_runtime_memory_accounting(state_dir, dtype, numerics):
    module = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    compiled = compile_from_torch(module, example_inputs=[torch.randn(4, 256)], dtype=dtype, numerics=numerics)
    assert device_memory.used_bytes(0) == 0
    first = Runtime(compiled)
    usage = first.stats.memory[0]
    assert usage.device == 0 and usage.npu == "RBLN-CA25"
    assert usage.weights_bytes == 2 * n_params(module)  # 16-bit on the device, also in exact mode
    assert usage.buffers_bytes == 0
    assert usage.capacity_bytes == ATOM_USABLE_BYTES
    assert usage.total_bytes == compiled.device_bytes
    assert device_memory.used_bytes(0) == usage.total_bytes
    second = Runtime(compiled)
    assert device_memory.used_bytes(0) == 2 * usage.total_bytes
    assert device_memory.used_bytes(1) == 0
    first.close()
    assert device_memory.used_bytes(0) == usage.total_bytes
    second.close()
    second.close()  # idempotent
    assert device_memory.used_bytes(0) == 0


def test_runtime_context_manager_and_garbage_collection_free_memory(state_dir):
    import gc

    compiled = compile_from_torch(nn.Linear(128, 128), example_inputs=[torch.randn(2, 128)])
    with Runtime(compiled) as runtime:
        assert device_memory.used_bytes(0) == runtime.stats.memory[0].total_bytes > 0
    assert device_memory.used_bytes(0) == 0
    runtime = Runtime(compiled)
    assert device_memory.used_bytes(0) > 0
    del runtime
    gc.collect()
    assert device_memory.used_bytes(0) == 0


@pytest.mark.parametrize("tp", [1, 4])
def test_a_dropped_runtime_frees_its_memory_without_waiting_for_a_garbage_collection(state_dir, tp):
    """A runtime holds no reference cycle (its generated code's context does not point back at it),
    so the last reference going frees its device memory at once, after a run too."""
    import gc

    compiled = compile_from_torch(nn.Linear(128, 128), example_inputs=[torch.randn(2, 128)], tensor_parallel_size=tp)
    gc.disable()
    try:
        runtime = Runtime(compiled)
        runtime(torch.randn(2, 128))
        assert device_memory.used_bytes(0) > 0
        del runtime
        assert device_memory.used_bytes(0) == 0
    finally:
        gc.enable()


def test_buffers_are_device_state(state_dir):
    class WithBuffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 32)
            self.register_buffer("scale", torch.rand(32) + 0.5)
            self.register_buffer("cache", torch.zeros(64, 32))  # zero-initialised state

        def forward(self, x):
            return self.lin(x) * self.scale + self.cache[:4]

    module = WithBuffers()
    x = torch.randn(4, 32)
    runtime = Runtime(compile_from_torch(module, example_inputs=[x]))
    usage = runtime.stats.memory[0]
    assert usage.weights_bytes == 2 * n_params(module)
    assert usage.buffers_bytes == 2 * (32 + 64 * 32)
    with torch.no_grad():
        expected = module(x)
    assert (runtime(x) - expected).abs().max() <= 2e-2 * expected.abs().max()


def test_shared_state_is_counted_once(state_dir, tmp_path):
    module = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))
    compiled = compile_from_torch(module, example_inputs=[torch.randn(4, 256)])
    owner = Runtime(compiled)
    sharer = Runtime(compiled, share_state_with=owner)
    assert sharer.stats.memory[0].weights_bytes == 0
    assert sharer.devices == owner.devices
    assert device_memory.used_bytes(0) == owner.stats.memory[0].total_bytes + sharer.stats.memory[0].activations_bytes
    x = torch.randn(4, 256)
    assert torch.equal(owner(x), sharer(x))
    # A file saved without its weights runs only next to the runtime that holds them.
    names = [name for name, _ in module.named_parameters()]
    path = compiled.save(tmp_path / "no_weights.rbln", external=names)
    assert len(open(path, "rb").read()) < 2 * n_params(module)
    with pytest.raises(ValueError, match="share_state_with"):
        Runtime(path)
    light = Runtime(path, share_state_with=owner)
    assert light.stats.memory[0].weights_bytes == 0
    assert torch.equal(light(x), owner(x))


def test_shared_weights_stay_allocated_while_in_use(state_dir):
    module = nn.Linear(256, 256)
    compiled = compile_from_torch(module, example_inputs=[torch.randn(4, 256)])
    owner = Runtime(compiled)
    sharer = Runtime(compiled, share_state_with=owner)
    owner.close()
    sharer(torch.randn(4, 256))  # still runs on the owner's weights
    assert device_memory.used_bytes(0) >= 2 * n_params(module)


def test_allocation_that_does_not_fit(state_dir):
    with pytest.raises(DeviceMemoryError) as info:
        device_memory.allocate("x", {0: 20 * GiB})
    message = str(info.value)
    assert "x needs 20.00 GiB" in message and "npu0" in message
    assert f"{ATOM_USABLE_BYTES / GiB:.2f} GiB usable" in message and f"{ATOM_USABLE_BYTES / GiB:.2f} GiB free" in message
    assert device_memory.used_bytes(0) == 0


def test_runtime_on_a_full_device(state_dir):
    compiled = compile_from_torch(nn.Linear(1024, 1024), example_inputs=[torch.randn(4, 1024)])  # 2 MiB
    hog = device_memory.allocate("Runtime(hog.rbln)", {0: ATOM_USABLE_BYTES - 2**20})
    try:
        assert device_memory.used_bytes(1) == 0
        with pytest.raises(DeviceMemoryError) as info:
            Runtime(compiled, name="mlp.rbln")
        message = str(info.value)
        assert "Runtime(mlp.rbln)" in message and "npu0" in message
        assert re.search(r"needs 2\.0\d MiB .* 1\.00 MiB free", message), message
        assert "Runtime(hog.rbln)" in message  # who holds the memory
        assert "tensor_parallel_size" in message and "RBLN-CR03" in message
        elsewhere = Runtime(compiled, device=1)  # another die of the card is free
        assert device_memory.used_bytes(1) == elsewhere.stats.memory[0].total_bytes
        elsewhere.close()
    finally:
        device_memory.release(hog.id)
    Runtime(compiled).close()


def test_allocations_of_other_processes(state_dir):
    """Device memory is shared between processes; records of exited processes are ignored."""
    script = textwrap.dedent(
        """
        import sys
        from optimum_npu.sim_device import memory
        memory.allocate("Runtime(other)", {0: 3 * 1024**3})
        print("allocated", flush=True)
        sys.stdin.readline()
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "allocated"
        assert device_memory.used_bytes(0) == 3 * GiB
        with pytest.raises(DeviceMemoryError, match=r"Runtime\(other\)"):
            device_memory.allocate("me", {0: 13 * GiB})
    finally:
        child.stdin.write("\n")
        child.stdin.flush()
        child.wait(timeout=60)
    assert device_memory.used_bytes(0) == 0
    device_memory.release(device_memory.allocate("me", {0: 13 * GiB}).id)


# --------------------------------------------------------------------------- 9. cost model


def _profiled(module, input_info, x):
    compiled = compile_from_torch(module, input_info=input_info)
    runtime = Runtime(compiled, activate_profiler=True)
    runtime(x)
    return compiled, runtime


def test_presets_are_the_published_figures():
    spec = optimum_npu.sim_device.get_npu_spec("RBLN-CA25")
    assert spec.dram_bandwidth == ATOM_DRAM_BW and spec.peak_flops_16bit == ATOM_PEAK_16BIT
    assert spec.pcie_bandwidth == PCIE_GEN5_X16 and spec.devices_per_card == 4
    assert spec.usable_dram_bytes == ATOM_USABLE_BYTES


def test_batch_one_linear_is_memory_bound(tmp_path):
    d = 4096
    module = nn.Linear(d, d).to(torch.bfloat16)
    _, runtime = _profiled(module, [("x", [1, d], "bfloat16")], torch.randn(1, d).to(torch.bfloat16))
    slices = load_trace(runtime.save_trace(tmp_path / "trace.json"))
    (dma,) = [s for s in slices if s["track"] == "Task DMA"]        # bf16 in: no cast kernels
    (engine,) = [s for s in slices if s["track"] == "Neural Engine Clusters"]
    weight_bytes = 2 * d * d
    streamed = weight_bytes + 2 * (d + d + d)  # + bias, input and output rows
    achievable_bw = ATOM_DRAM_BW * CAL.dram_peak_utilisation
    dma_s = streamed / achievable_bw + CAL.dma_setup_s
    assert dma["dur"] * US == pytest.approx(dma_s, rel=1e-4)
    assert dma["dur"] * US == pytest.approx(weight_bytes / achievable_bw, rel=2e-2)
    assert dma["args"]["bytes"] == streamed
    # One row (M = 1) uses the engines poorly, yet 2*d*d FLOPs are still far quicker than
    # streaming d*d weights: the engines mostly wait.
    compute = 2 * d * d / (ATOM_PEAK_16BIT * CAL.matmul_utilisation(1))
    assert engine["dur"] * US == pytest.approx(compute, rel=2e-2, abs=2e-9)
    assert engine["dur"] < dma["dur"]
    # The kernel lasts its DMA time plus the launch; the copy out starts right after.
    (copy_out,) = [s for s in slices if s["track"] == "External HDMA" and s["args"]["direction"] == "d2h"]
    assert (copy_out["ts"] - dma["ts"]) * US == pytest.approx(dma_s + CAL.kernel_launch_s, abs=2e-9)


def test_large_batch_matmul_is_compute_bound(tmp_path):
    tokens, d = 2048, 1024
    module = nn.Linear(d, d).to(torch.bfloat16)
    x = torch.randn(tokens, d).to(torch.bfloat16)
    _, runtime = _profiled(module, [("x", [tokens, d], "bfloat16")], x)
    slices = load_trace(runtime.save_trace(tmp_path / "trace.json"))
    (dma,) = [s for s in slices if s["track"] == "Task DMA"]
    (engine,) = [s for s in slices if s["track"] == "Neural Engine Clusters"]
    flops = 2 * tokens * d * d
    matmul_s = flops / (ATOM_PEAK_16BIT * CAL.matmul_utilisation(tokens))
    bias_s = tokens * d / (ATOM_PEAK_16BIT * CAL.vector_fraction_of_peak)  # one add per output element
    assert engine["dur"] * US == pytest.approx(matmul_s, rel=1e-2)
    assert engine["dur"] * US == pytest.approx(matmul_s + bias_s, rel=1e-5)
    streamed = 2 * (d * d + d + 2 * tokens * d)
    assert dma["dur"] * US == pytest.approx(streamed / (ATOM_DRAM_BW * CAL.dram_peak_utilisation) + CAL.dma_setup_s,
                                            rel=1e-5)
    assert engine["dur"] > 5 * dma["dur"]
    # Host <-> device copies of the [tokens, d] bf16 activations at the PCIe rate.
    copies = [s for s in slices if s["track"] == "External HDMA"]
    assert len(copies) == 2
    for copy in copies:
        assert copy["args"]["bytes"] == 2 * tokens * d
        expected = 2 * tokens * d / (PCIE_GEN5_X16 * CAL.pcie_efficiency) + CAL.hdma_latency_s
        assert copy["dur"] * US == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("build,shape", [(WithHostOp, (8, 64)), (PreNormBlock, (2, 8, 64))], ids=["host-op", "block"])
def test_run_time_is_the_critical_path_of_the_trace(build, shape, tmp_path):
    module = build().eval()
    x = torch.randn(shape)
    compiled = compile_from_torch(module, example_inputs=[x])
    runtime = Runtime(compiled, activate_profiler=True)
    runtime(x)
    stats = runtime.stats
    slices = load_trace(runtime.save_trace(tmp_path / "trace.json"))
    rounding = 1e-9 * len(slices)  # the trace holds microseconds rounded to 1e-3 (5e-10 s per value)
    # One step after the other: copies, host segments, and per kernel the longer of engines / Task DMA.
    kernels = {}
    for s in slices:
        if s["track"] in ("Neural Engine Clusters", "Task DMA"):
            kernels.setdefault((s["ts"], s["name"]), []).append(s["dur"])
    assert all(len(durations) == 2 for durations in kernels.values())
    critical = (
        sum(s["dur"] for s in slices if s["track"] in ("External HDMA", "Host")) * US
        + sum(max(durations) * US + CAL.kernel_launch_s for durations in kernels.values())
        + CAL.run_overhead_s
    )
    assert stats.last_run_s == pytest.approx(critical, abs=rounding)
    assert stats.total_s == stats.last_run_s and stats.runs == 1
    last_end = max(s["ts"] + s["dur"] for s in slices) * US
    assert stats.last_run_s == pytest.approx(last_end + CAL.run_overhead_s, abs=rounding)
    # The stats break the same time down by track, exactly.
    parts = stats.device_kernels_s + stats.external_hdma_s + stats.host_fallback_s + stats.overhead_s
    assert stats.total_s == pytest.approx(parts, rel=1e-12)
    assert (stats.host_fallback_s > 0) == (build is WithHostOp)
    # The compile-time estimate is the runtime's clock.
    assert compiled.estimated_latency_s == pytest.approx(stats.last_run_s, rel=1e-12)
    # A second run starts where the first ended and costs the same.
    runtime(x)
    assert stats.runs == 2 and stats.total_s == pytest.approx(2 * stats.last_run_s, rel=1e-12)
    second = load_trace(runtime.save_trace(tmp_path / "trace2.json"))[len(slices):]
    assert min(s["ts"] for s in second) * US == pytest.approx(stats.last_run_s, abs=rounding)


def test_profiler_does_not_change_the_clock():
    module = PreNormBlock().eval()
    x = torch.randn(2, 8, 64)
    compiled = compile_from_torch(module, example_inputs=[x])
    plain, profiled = Runtime(compiled), Runtime(compiled, activate_profiler=True)
    for _ in range(2):
        assert torch.equal(plain(x), profiled(x))
    fields = ("runs", "total_s", "last_run_s", "device_kernels_s", "neural_engine_busy_s", "task_dma_busy_s",
              "external_hdma_s", "host_fallback_s", "overhead_s")
    for name in fields:
        assert getattr(plain.stats, name) == pytest.approx(getattr(profiled.stats, name), rel=1e-12), name


def test_fp16_bf16_and_exact_programs_cost_the_same():
    module = PreNormBlock().eval()
    x = torch.randn(2, 8, 64)
    runs = {}
    for dtype, numerics in (("bfloat16", "device"), ("float16", "device"), ("bfloat16", "exact"), ("float16", "exact")):
        compiled = compile_from_torch(module, example_inputs=[x], dtype=dtype, numerics=numerics)
        runtime = Runtime(compiled)
        runtime(x)
        m = runtime.stats.memory[0]
        runs[dtype, numerics] = (
            compiled.device_bytes, runtime.stats.last_run_s, m.weights_bytes, m.buffers_bytes, m.activations_bytes
        )
        runtime.close()
    assert len(set(runs.values())) == 1, runs


def matmul_seconds(rows: int, features: int = 4096) -> float:
    """Neural-engine time of one [rows, features] x [features, features] bf16 product (no bias)."""
    with torch.device("meta"):
        module = nn.Linear(features, features, bias=False)
    program = compile_from_torch(module, input_info=[("x", [rows, features], "bfloat16")]).program
    (step,) = [s for s in program.steps if s.kind == "kernel"]
    assert step.matmul_rows == rows
    from optimum_npu.sim_device.cost_model import CostModel
    from optimum_npu.sim_device.specs import get_npu_spec

    return CostModel(get_npu_spec("RBLN-CA25")).price(step).compute_s


def test_matmul_utilisation_follows_the_shape():
    """Tile quantisation: 1 to 8 rows take one pass of the matrix engines (the same time); a
    9th row takes a second pass. Utilisation grows with M towards its large-matrix value, and
    never exceeds what the spec-sheet peak allows."""
    one, eight, nine = matmul_seconds(1), matmul_seconds(8), matmul_seconds(9)
    assert one == pytest.approx(eight, rel=1e-12) and nine > eight
    utilisation = {m: CAL.matmul_utilisation(m) for m in (1, 8, 128, 1024)}
    assert utilisation[1] < utilisation[8] < utilisation[128] < utilisation[1024] <= CAL.matmul_peak_utilisation
    for m in (1, 8, 128, 1024):  # time >= FLOPs at the published peak
        assert matmul_seconds(m) >= 2 * m * 4096 * 4096 / ATOM_PEAK_16BIT


def test_small_transfers_stream_below_the_peak_rate():
    """Each kernel's DMA pays a setup latency: a small kernel's effective bandwidth is lower."""
    from optimum_npu.sim_device.cost_model import CostModel
    from optimum_npu.sim_device.specs import get_npu_spec

    model = CostModel(get_npu_spec("RBLN-CA25"))
    small, large = model.kernel(0, 0, 4096), model.kernel(0, 0, 1 << 30)
    assert 4096 / small.dma_s < 0.1 * (1 << 30) / large.dma_s
    assert (1 << 30) / large.dma_s <= ATOM_DRAM_BW


def test_bigger_problems_cost_more():
    """Monotonicity: more tokens or wider layers never make a run cheaper."""
    latencies = []
    for tokens in (1, 64, 512, 2048):
        with torch.device("meta"):
            module = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))
        latencies.append(compile_from_torch(module, input_info=[("x", [tokens, 1024], "bfloat16")]).estimated_latency_s)
    assert latencies == sorted(latencies) and latencies[0] < latencies[-1]
