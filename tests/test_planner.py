"""`optimum_npu.plan` / `optimum-npu plan`: deployments of a tiny Llama ranked by simulated serving,
the 1-layer / 2-layer scaling checked against a compilation of the whole model, the shared exports
checked against compiling each graph on its own, and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

import optimum_npu
from optimum_npu.sim_device import power
from optimum_npu.cli import main
from optimum_npu.compile import compile_from_torch
from optimum_npu.compile.compiler import compile_exported, export
from optimum_npu.modeling.auto import RBLNAutoModelForCausalLM
from optimum_npu.planning.meta import CompileCache, compile_decoder_on_meta
from optimum_npu.planning.planner import _ScaledGraph, _with_layers
from llm_fixtures import hf_config

SMALL = dict(tensor_parallel_sizes=(1,), batch_sizes=(1, 4), chunk_sizes=(64,))


@pytest.fixture(scope="module")
def config_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf_config("llama", num_hidden_layers=4).save_pretrained(folder)
    return folder


def test_plan_ranks_feasible_deployments(config_folder):
    result = optimum_npu.plan(config_folder, "RBLN-CA25", input_len=100, output_len=20, **SMALL)
    assert [c.batch_size for c in result.candidates] and all(c.attn_impl == "eager" for c in result.candidates)
    per_watt = [c.tokens_per_s_per_watt for c in result.candidates]
    assert per_watt == sorted(per_watt, reverse=True)
    for c in result.candidates:
        assert c.max_seq_len >= 120 and c.ttft_s > 0 and c.tpot_s > 0
        assert c.tokens_per_s_per_card == pytest.approx(c.tokens_per_s * 4)   # 4 devices per CA25 card at TP 1
        assert c.tokens_per_s_per_server == pytest.approx(8 * c.tokens_per_s_per_card)
        assert c.tokens_per_s_per_rack == pytest.approx(100 * c.tokens_per_s_per_card)  # 35 kW / 350 W
        # Per watt of the card's simulated power: above what it draws at rest, at most its 350 W TDP.
        assert 350 * power.IDLE_FRACTION_OF_TDP < c.card_watts <= 350
        assert c.tokens_per_s_per_watt == pytest.approx(c.tokens_per_s_per_card / c.card_watts)
    batch4 = next(c for c in result.candidates if c.batch_size == 4)
    batch1 = next(c for c in result.candidates if c.batch_size == 1)
    assert batch4.tokens_per_s > batch1.tokens_per_s  # batching shares the weight streaming
    assert any("flash_attn" in reason for reason in result.rejected)  # 256 positions: no flash max_seq_len
    assert "TP" in result.table() and "tok/s/W" in result.table()


def test_a_server_holds_the_cards_of_its_preset(config_folder):
    """An ATOM-Max server holds 8 cards (32 devices); the vendor's ATOM server, 16 single-device cards."""
    from optimum_npu.sim_device.specs import get_npu_spec

    assert get_npu_spec("RBLN-CA25").cards_per_server == 8 and get_npu_spec("RBLN-CA12").cards_per_server == 16
    result = optimum_npu.plan(config_folder, "RBLN-CA12", input_len=100, output_len=20, **SMALL)
    for c in result.candidates:
        assert c.tokens_per_s_per_card == pytest.approx(c.tokens_per_s)   # one device per CA12 card at TP 1
        assert c.tokens_per_s_per_server == pytest.approx(16 * c.tokens_per_s_per_card)


def test_layer_scaling_equals_compiling_the_whole_model():
    config = hf_config("llama", num_hidden_layers=4)
    options = dict(rbln_max_seq_len=256, rbln_prefill_chunk_size=64, rbln_batch_size=2)
    _, whole = compile_decoder_on_meta(config, **options)
    _, one = compile_decoder_on_meta(_with_layers(config, 1), **options)
    _, two = compile_decoder_on_meta(_with_layers(config, 2), **options)
    for name in whole:
        scaled = _ScaledGraph(one[name], two[name], 4)
        for kv_len in (64, 200):
            assert scaled.estimate(kv_len).total_s == pytest.approx(whole[name].estimate(kv_len).total_s, rel=1e-9)


def test_plan_refuses_bad_inputs(config_folder):
    with pytest.raises(ValueError, match="RBLN-CA25"):
        optimum_npu.plan(config_folder, "RBLN-XX", input_len=10, output_len=10, **SMALL)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        optimum_npu.plan(config_folder, input_len=200, output_len=100, **SMALL)  # 300 > 256 positions
    with pytest.raises(ValueError, match="input_len"):
        optimum_npu.plan(config_folder, input_len=0, output_len=10, **SMALL)
    with pytest.raises(ValueError, match="batch_sizes"):
        optimum_npu.plan(config_folder, input_len=10, output_len=10, tensor_parallel_sizes=(1,), batch_sizes=())
    huge = hf_config("llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                     num_attention_heads=64, num_key_value_heads=8)
    with pytest.raises(ValueError, match="no deployment .* fits"):  # 70B-sized weights on one device
        optimum_npu.plan(huge, input_len=10, output_len=10, **SMALL)


def test_the_plot_labels_tell_every_deployment_apart(config_folder):
    import dataclasses

    from optimum_npu.planning.planner import _plot_labels

    c = optimum_npu.plan(config_folder, "RBLN-CA25", input_len=100, output_len=20, **SMALL).candidates[0]
    same_tp_and_batch = [c, dataclasses.replace(c, attn_impl="flash_attn", kvcache_partition_len=4096),
                         dataclasses.replace(c, prefill_chunk_size=128)]
    labels = _plot_labels(same_tp_and_batch)
    assert len(set(labels)) == 3, labels
    tp, b = c.tensor_parallel_size, c.batch_size
    assert labels[1] == f"#2 TP{tp} b{b} c{c.prefill_chunk_size} flash p4096"   # row 2 of Plan.table()
    assert _plot_labels([c]) == [f"#1 TP{tp} b{b}"]   # nothing else to tell apart


def test_cli_plan_prints_json_and_plots(config_folder, capsys, tmp_path):
    plot = tmp_path / "plan.png"
    code = main(["plan", str(config_folder), "--input-len", "100", "--output-len", "20", "--tensor-parallel-sizes",
                 "1", "--batch-sizes", "2", "--chunk-sizes", "64", "--json", "--plot", str(plot)])
    assert code == 0
    (candidate,) = json.loads(capsys.readouterr().out)
    assert candidate["batch_size"] == 2 and candidate["tensor_parallel_size"] == 1 and candidate["tpot_s"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plan", str(config_folder), "--input-len", "0", "--output-len", "20"]) == 2  # a clear one-line error


def test_one_export_compiles_like_compile_from_torch_for_every_target():
    """`compile_exported` leaves the exported graph as it was: compiling it for TP 2 and then TP 1
    gives the programs `compile_from_torch` gives from scratch for each."""
    config = hf_config("llama", num_hidden_layers=2)
    cls = RBLNAutoModelForCausalLM.class_for_config(config)
    rbln_config = cls.config_class.from_kwargs(dict(rbln_max_seq_len=256, rbln_batch_size=2))[0].finalize(config)
    with torch.device("meta"):
        specs = cls._graph_specs(cls.hf_class(config), rbln_config)
    for spec in specs:
        graph = export(spec.module, input_info=list(spec.input_info))
        for tp in (2, 1):
            reused = compile_exported(graph, npu="RBLN-CA25", tensor_parallel_size=tp)
            fresh = compile_from_torch(spec.module, input_info=list(spec.input_info), npu="RBLN-CA25",
                                       tensor_parallel_size=tp)
            assert reused.program == fresh.program, (spec.name, tp)


def test_compile_cache_shares_only_what_does_not_change_a_graph():
    """A sweep through one `CompileCache` (TP 1 / 2, chunk 64 / 128) gives, for every graph, the
    program a compilation of its own gives; decode graphs are shared across chunks, not across TP."""
    config = hf_config("llama", num_hidden_layers=2)
    cache = CompileCache()
    swept = {}
    for tp in (1, 2):
        for chunk in (64, 128):
            options = dict(rbln_max_seq_len=256, rbln_batch_size=2, rbln_decoder_batch_sizes=[1, 2],
                           rbln_prefill_chunk_size=chunk, rbln_tensor_parallel_size=tp)
            _, shared = compile_decoder_on_meta(config, check_memory=False, cache=cache, **options)
            _, alone = compile_decoder_on_meta(config, check_memory=False, **options)
            assert {n: g.program for n, g in shared.items()} == {n: g.program for n, g in alone.items()}
            swept[tp, chunk] = shared
    assert swept[1, 64]["decoder_batch_2"] is swept[1, 128]["decoder_batch_2"]
    assert swept[1, 64]["prefill"] is not swept[1, 128]["prefill"]
    assert swept[1, 64]["decoder_batch_2"] is not swept[2, 64]["decoder_batch_2"]


def test_a_latency_objective_keeps_exactly_the_deployments_that_meet_it(config_folder, capsys):
    options = dict(tensor_parallel_sizes=(1,), batch_sizes=(1, 2, 4), chunk_sizes=(64,))
    unbounded = optimum_npu.plan(config_folder, "RBLN-CA25", input_len=100, output_len=20, **options)
    tpots = sorted(c.tpot_s for c in unbounded.candidates)
    bound = (tpots[0] + tpots[-1]) / 2
    bounded = optimum_npu.plan(config_folder, "RBLN-CA25", input_len=100, output_len=20, max_tpot_s=bound, **options)
    expected = [(c.batch_size, c.tpot_s) for c in unbounded.candidates if c.tpot_s <= bound]
    assert [(c.batch_size, c.tpot_s) for c in bounded.candidates] == expected and 0 < len(expected) < len(tpots)
    assert any("objective" in reason for reason in bounded.rejected) and "TPOT <=" in bounded.table()
    with pytest.raises(ValueError, match="no deployment"):
        optimum_npu.plan(config_folder, "RBLN-CA25", input_len=100, output_len=20, max_tpot_s=tpots[0] / 2, **options)
    with pytest.raises(ValueError, match="max_ttft_s"):
        optimum_npu.plan(config_folder, input_len=100, output_len=20, max_ttft_s=0, **options)
    code = main(["plan", str(config_folder), "--input-len", "100", "--output-len", "20", "--tensor-parallel-sizes",
                 "1", "--batch-sizes", "1", "2", "4", "--chunk-sizes", "64", "--max-tpot-ms", str(bound * 1e3),
                 "--json"])
    assert code == 0 and len(json.loads(capsys.readouterr().out)) == len(expected)


@pytest.mark.parametrize("field,value,match", [
    ("num_hidden_layers", 10**9, "num_hidden_layers must be an integer from 1 to 1024, got 1000000000"),
    ("num_hidden_layers", -5, "num_hidden_layers must be an integer from 1 to 1024, got -5"),
    ("num_hidden_layers", 0, "num_hidden_layers must be an integer from 1 to 1024, got 0"),
    ("num_key_value_heads", 3, r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"),
    ("num_key_value_heads", 0, "num_key_value_heads must be an integer from 1"),
    ("hidden_size", -64, "hidden_size must be an integer from 1"),
    ("vocab_size", 2**40, "vocab_size must be an integer from 1 to"),
    ("intermediate_size", 1.5, "intermediate_size"),   # transformers refuses the type itself
])
def test_plan_refuses_absurd_configs_naming_the_field(tmp_path, field, value, match):
    """Absurd or negative sizes are a ValueError naming the field and its range, before anything is
    built (a billion layers grew the process to 4 GiB; -5 layers gave negative memory; 0 layers a plan)."""
    folder = tmp_path / "config"
    config = hf_config("llama", num_hidden_layers=4)
    folder.mkdir()
    config.save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data[field] = value
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        optimum_npu.plan(folder, input_len=10, output_len=10, **SMALL)
    assert main(["plan", str(folder), "--input-len", "10", "--output-len", "10"]) == 2


def test_parameters_are_counted_from_the_layer_count_not_by_building_every_layer():
    """The planner's count (1- and 2-layer copies, scaled) against transformers' model of all the layers."""
    from transformers import AutoModelForCausalLM

    from optimum_npu.planning.planner import _parameter_count

    for family in ("llama", "qwen2", "qwen3"):
        config = hf_config(family, num_hidden_layers=5)
        with torch.device("meta"):
            reference = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        assert _parameter_count(config) == reference, family


def test_plan_refuses_a_rack_power_that_is_not_one(config_folder, capsys):
    for kw in ("-1", "0", "nan", "inf"):
        assert main(["plan", str(config_folder), "--input-len", "10", "--output-len", "10",
                     "--rack-power-kw", kw]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--rack-power-kw" in err, err
    with pytest.raises(ValueError, match="rack_power_w"):
        optimum_npu.plan(config_folder, input_len=10, output_len=10, rack_power_w=-1000.0, **SMALL)


def test_plan_when_the_sequence_is_one_prefill_chunk(config_folder):
    """input + output = 128 = the chunk = max_seq_len: one tabulated point (ZeroDivisionError before)."""
    result = optimum_npu.plan(config_folder, "RBLN-CA25", input_len=100, output_len=28, tensor_parallel_sizes=(1,),
                              batch_sizes=(1, 2), chunk_sizes=(128,))
    eager = [c for c in result.candidates if c.attn_impl == "eager"]
    assert eager and all(c.max_seq_len == 128 and c.tpot_s > 0 and c.ttft_s > 0 for c in eager)


def test_planner_memory_per_device_equals_the_compiled_deployment_at_every_tensor_parallel_size():
    """Two KV heads over up to 8 devices: from TP 4 on, each rank holds one whole KV head (not 1/TP of
    the cache), and a cache shard over a DRAM page takes whole pages. The planner's bytes per device for
    each (TP, batch) must be those of the deployment compiled whole (prefill and the decode buckets up to
    the batch, a KV pool of batch x blocks per slot), byte for byte."""
    # head_dim 48, 4096 positions: a K or V cache of 4 slots is 3 MiB at TP 1 (two 2 MiB pages), 1.5 MiB
    # per rank from TP 2 on (one KV head each); 4096 positions is eager attention only (flash needs 8192).
    # Two layers: the planner's own compilation, so the activation arena is the compiled one (a deeper
    # model's arena may differ by a few of one layer's values: the greedy placement settles after 2-3 layers).
    config = hf_config("llama", num_hidden_layers=2, hidden_size=384, intermediate_size=256, num_attention_heads=8,
                       num_key_value_heads=2, max_position_embeddings=4096)
    batches = (1, 4)
    result = optimum_npu.plan(config, "RBLN-CA25", input_len=3000, output_len=1000, tensor_parallel_sizes=(1, 2, 4, 8),
                              batch_sizes=batches, chunk_sizes=(128,))
    seen, cache = set(), CompileCache()  # each graph exported once per KV pool size
    for c in result.candidates:
        block = c.max_seq_len if c.attn_impl == "eager" else c.kvcache_partition_len
        options = dict(rbln_tensor_parallel_size=c.tensor_parallel_size, rbln_batch_size=c.batch_size,
                       rbln_decoder_batch_sizes=[b for b in batches if b <= c.batch_size],
                       rbln_max_seq_len=c.max_seq_len, rbln_prefill_chunk_size=c.prefill_chunk_size,
                       rbln_attn_impl=c.attn_impl, rbln_kvcache_num_blocks=c.batch_size * (c.max_seq_len // block))
        if c.kvcache_partition_len:
            options["rbln_kvcache_partition_len"] = c.kvcache_partition_len
        _, graphs = compile_decoder_on_meta(config, check_memory=False, cache=cache, **options)
        compiled = max(g.device_bytes for g in graphs.values())
        assert c.memory_per_device_bytes == compiled, (c.tensor_parallel_size, c.batch_size, c.attn_impl)
        seen.add((c.tensor_parallel_size, c.batch_size, c.attn_impl))
    assert {(tp, b) for tp, b, _ in seen} == {(tp, b) for tp in (1, 2, 4, 8) for b in batches}
