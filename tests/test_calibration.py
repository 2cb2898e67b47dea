"""The cost and power models against public measurements of real RBLN cards (the figures and their
sources: docs/performance-model.md, "Calibration"). Every expected value here is a measurement, never
a figure the simulator produced; the tolerance is the calibration's goal, 10%. The Qwen3-4B TP 4
points (a 36-layer model compiled on the meta device) are in the heavy tier; `python
benchmarks/calibration.py` prints every point."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from optimum_npu.sim_device import power
from optimum_npu.sim_device.specs import get_npu_spec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import calibration  # noqa: E402  (benchmarks/ is not a package: the figures and model configs live there)

TOLERANCE = 0.10


@pytest.fixture(scope="module")
def single_graph_points():
    """(name, unit, measured, predicted) of ResNet-50 and BERT-base on one RBLN-CA22 (time and power)."""
    return calibration.single_graph_rows()


def test_resnet50_and_bert_base_end_to_end_and_card_power_are_the_measured_ones(single_graph_points):
    """Batch 1 on one RBLN-CA22, end to end as a user times the synchronous runtime: 0.716 ms (ResNet-50,
    224x224) and 1.595 ms (BERT-base, 128 tokens); card power 38.9 W and 37.0 W; 18.9 W at rest."""
    assert {unit for _, unit, _, _ in single_graph_points} == {"ms", "W"}
    for name, unit, measured, predicted in single_graph_points:
        assert predicted == pytest.approx(measured, rel=TOLERANCE), name


def test_power_rises_from_idle_to_the_tdp():
    """At rest a card draws the measured idle power; at full compute and DRAM activity, its TDP."""
    spec = get_npu_spec("RBLN-CA22")
    assert power.card_watts(spec, 0.0, 0.0) == pytest.approx(calibration.IDLE_W, rel=TOLERANCE)
    assert power.card_watts(spec, 1.0, 1.0) == pytest.approx(spec.card_tdp_watts)
    assert power.card_watts(spec, 0.2, 0.4) < power.card_watts(spec, 0.4, 0.4) < power.card_watts(spec, 0.4, 0.6)
    with pytest.raises(ValueError, match="compute_utilisation must be between 0 and 1"):
        power.card_watts(spec, 1.5, 0.0)


@pytest.mark.heavy  # Qwen3-4B (36 layers) at TP 4 on the meta device: ~1-3 min on a busy 2-core machine
def test_qwen3_4b_tensor_parallel_4_points_are_the_measured_ones():
    """Decode steps at batch 1/2/4/8, prefill of 500/2000/6000 tokens and device memory per device of
    Qwen3-4B on an RBLN-CA25 card at TP 4, as measured (docs/hardware.md)."""
    for name, unit, measured, predicted in calibration.qwen_rows(decode_context=1088):
        assert predicted == pytest.approx(measured, rel=TOLERANCE), name


def test_a_token_embedding_looked_up_on_the_host_takes_no_device_memory():
    """optimum-rbln's decoders look the token embedding up on the host and compile from inputs_embeds,
    so the table takes no device DRAM; with rbln_use_inputs_embeds ours does the same: the device holds
    the table's 2 MiB pages fewer (an untied Llama: the LM head, a separate tensor, stays)."""
    from transformers import LlamaConfig

    from optimum_npu.planning.meta import compile_decoder_on_meta

    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    table_pages = -(-32000 * 256 * 2 // (2 * 2**20)) * 2 * 2**20  # bf16 table in whole 2 MiB pages
    device = {}
    for on_host in (False, True):
        _, graphs = compile_decoder_on_meta(config, check_memory=False, rbln_max_seq_len=256, rbln_batch_size=1,
                                            rbln_use_inputs_embeds=on_host, rbln_npu="RBLN-CA22")
        device[on_host] = {name: g.device_bytes for name, g in graphs.items()}
    assert {name: device[False][name] - device[True][name] for name in device[False]} == {
        name: table_pages for name in device[False]}


@pytest.mark.heavy  # Llama-3.1-8B (32 layers) and Llama-3.2-1B on the meta device
def test_llama_device_memory_is_the_measured_one():
    """Device memory on one RBLN-CA22: Llama-3.1-8B at max_seq_len 512, batch 1 (14,630 MiB) and
    Llama-3.2-1B at max_seq_len 8192, batch 4 (3.4 GiB), within 5%."""
    for name, unit, measured, predicted in calibration.memory_rows():
        assert predicted == pytest.approx(measured, rel=0.05), name
