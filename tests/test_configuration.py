"""RBLNModelConfig and the decoder-only config: option parsing, validation, freezing, JSON."""

import dataclasses
import json
import os

import pytest
from transformers import LlamaConfig

from optimum_npu.configuration import CONFIG_NAME, CONFIG_REGISTRY, RBLNModelConfig
from optimum_npu.modeling.decoderonly.configuration_decoderonly import (
    RBLNDecoderOnlyModelForCausalLMConfig,
    RBLNLlamaForCausalLMConfig,
    RBLNMistralForCausalLMConfig,
    RBLNQwen2ForCausalLMConfig,
)

Cfg = RBLNLlamaForCausalLMConfig


def hf_config(max_position_embeddings=8192):
    return LlamaConfig(max_position_embeddings=max_position_embeddings)


def finalized(max_position_embeddings=65536, **options):
    return Cfg(**options).finalize(hf_config(max_position_embeddings))


# --- three equivalent ways to pass options ---------------------------------------------------------


def test_kwargs_dict_and_object_give_equal_configs():
    by_kwargs, _ = Cfg.from_kwargs({"rbln_batch_size": 4, "rbln_max_seq_len": 4096})
    by_dict, _ = Cfg.from_kwargs({"rbln_config": {"batch_size": 4, "max_seq_len": 4096}})
    by_object, _ = Cfg.from_kwargs({"rbln_config": Cfg(batch_size=4, max_seq_len=4096)})
    assert by_kwargs == by_dict == by_object
    assert by_kwargs.batch_size == 4 and by_kwargs.max_seq_len == 4096


def test_rbln_kwargs_override_dict_and_object():
    from_dict, _ = Cfg.from_kwargs({"rbln_config": {"batch_size": 4, "dtype": "float16"}, "rbln_batch_size": 2})
    from_object, _ = Cfg.from_kwargs({"rbln_config": Cfg(batch_size=4, dtype="float16"), "rbln_batch_size": 2})
    assert from_dict == from_object
    assert (from_dict.batch_size, from_dict.dtype) == (2, "float16")


def test_non_rbln_kwargs_pass_through_untouched():
    kwargs = {"rbln_batch_size": 2, "torch_dtype": "auto", "revision": "main", "export": True}
    config, remaining = Cfg.from_kwargs(kwargs)
    assert remaining == {"torch_dtype": "auto", "revision": "main", "export": True}
    assert "rbln_batch_size" in kwargs  # the caller's dict is not modified
    assert config.batch_size == 2


def test_parent_class_object_is_accepted_sibling_is_not():
    config, _ = Cfg.from_kwargs({"rbln_config": RBLNDecoderOnlyModelForCausalLMConfig(batch_size=3)})
    assert type(config) is Cfg and config.batch_size == 3
    with pytest.raises(TypeError, match="RBLNQwen2ForCausalLMConfig"):
        Cfg.from_kwargs({"rbln_config": RBLNQwen2ForCausalLMConfig()})
    with pytest.raises(TypeError, match="rbln_config"):
        Cfg.from_kwargs({"rbln_config": 42})


def test_unknown_option_in_kwargs_suggests_closest():
    with pytest.raises(ValueError, match="rbln_max_seqlen") as err:
        Cfg.from_kwargs({"rbln_max_seqlen": 4096})
    assert "Did you mean rbln_max_seq_len?" in str(err.value)
    assert "rbln_kvcache_partition_len" in str(err.value)  # lists the valid options


def test_unknown_option_in_dict_suggests_closest():
    with pytest.raises(ValueError, match="batchsize") as err:
        Cfg.from_kwargs({"rbln_config": {"batchsize": 2}})
    assert "Did you mean batch_size?" in str(err.value)


def test_internal_fields_are_not_options():
    with pytest.raises(ValueError, match="rbln_graphs"):
        Cfg.from_kwargs({"rbln_graphs": {}})


# --- base options -----------------------------------------------------------------------------------


def test_defaults():
    config = RBLNModelConfig()
    assert (config.npu, config.tensor_parallel_size, config.dtype, config.numerics, config.batch_size) == (
        "RBLN-CA25", 1, "bfloat16", "device", 1,
    )
    assert (config.create_runtimes, config.device, config.activate_profiler) == (True, None, False)
    assert RBLNModelConfig.runtime_option_names() == ("create_runtimes", "device", "activate_profiler", "cache")
    assert "max_seq_len" in Cfg.compile_option_names() and "graphs" not in Cfg.option_names()


def test_dtype_must_be_16_bit():
    with pytest.raises(ValueError, match="rbln_dtype must be one of 'bfloat16', 'float16'; got 'fp8'"):
        Cfg(dtype="fp8")


def test_dtype_accepts_torch_dtype():
    import torch

    assert Cfg(dtype=torch.float16).dtype == "float16"


def test_numerics_values():
    assert Cfg(numerics="exact").numerics == "exact"
    with pytest.raises(ValueError, match="rbln_numerics"):
        Cfg(numerics="fp32")


def test_unknown_npu():
    with pytest.raises(ValueError, match="rbln_npu.*RBLN-CA25"):
        Cfg(npu="RBLN-XX99")


def test_tensor_parallel_size_bounds():
    assert Cfg(npu="RBLN-CA25", tensor_parallel_size=32).tensor_parallel_size == 32  # 8 cards x 4 devices
    with pytest.raises(ValueError, match="rbln_tensor_parallel_size must be <= 32"):
        Cfg(npu="RBLN-CA25", tensor_parallel_size=33)
    # The preset says how many cards a server holds: 16 single-device ATOM cards.
    assert Cfg(npu="RBLN-CA12", tensor_parallel_size=16).tensor_parallel_size == 16
    with pytest.raises(ValueError, match=r"rbln_tensor_parallel_size must be <= 16 .*x 16 cards per server"):
        Cfg(npu="RBLN-CA12", tensor_parallel_size=17)
    with pytest.raises(ValueError, match="rbln_tensor_parallel_size"):
        Cfg(tensor_parallel_size=0)
    with pytest.raises(TypeError, match="rbln_tensor_parallel_size"):
        Cfg(tensor_parallel_size=2.0)


def test_batch_size_type_and_value():
    with pytest.raises(ValueError, match="rbln_batch_size"):
        Cfg(batch_size=0)
    with pytest.raises(TypeError, match="rbln_batch_size"):
        Cfg(batch_size=True)  # a bool is not a batch size
    with pytest.raises(TypeError, match="rbln_batch_size"):
        Cfg(batch_size="4")


def test_runtime_option_types():
    with pytest.raises(TypeError, match="rbln_create_runtimes"):
        Cfg(create_runtimes="yes")
    with pytest.raises(TypeError, match="rbln_activate_profiler"):
        Cfg(activate_profiler=1)
    with pytest.raises(ValueError, match="rbln_device"):
        Cfg(device=-1)
    with pytest.raises(TypeError, match="rbln_device"):
        Cfg(device="npu0")


def test_device_list_one_id_per_tensor_parallel_rank():
    assert Cfg(tensor_parallel_size=2, device=[2, 3]).device == (2, 3)
    with pytest.raises(ValueError, match="rbln_device"):
        Cfg(tensor_parallel_size=2, device=[0])
    with pytest.raises(ValueError, match="rbln_device"):
        Cfg(tensor_parallel_size=2, device=[1, 1])
    with pytest.raises(ValueError, match="rbln_device"):
        Cfg(tensor_parallel_size=2, device=0)


def test_devices_are_checked_against_the_machine_only_when_asked(monkeypatch):
    monkeypatch.delenv("OPTIMUM_NPU_SYSTEM", raising=False)  # one RBLN-CA25 card: devices 0..3
    compile_only = Cfg(device=7, create_runtimes=False)  # a config may name a device of another machine
    with pytest.raises(ValueError, match="rbln_device=7 does not exist: this machine has devices 0..3"):
        compile_only.check_devices_exist()
    Cfg(device=3).check_devices_exist()
    Cfg().check_devices_exist()  # no device: the runtime picks one
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", "RBLN-CA25,RBLN-CR03")
    # RBLN-CA25 has 4 devices per card, RBLN-CR03 one: devices 0..3 and 4.
    with pytest.raises(ValueError, match="rbln_device=4 is a RBLN-CR03.*rbln_npu='RBLN-CA25'"):
        Cfg(tensor_parallel_size=2, device=[3, 4]).check_devices_exist()
    Cfg(npu="RBLN-CR03", device=4).check_devices_exist()


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", ".hidden", "", 3])
def test_graph_names_are_plain_file_names(name):
    with pytest.raises((ValueError, TypeError), match="plain name"):
        Cfg().with_compiled(cls_name="RBLNLlamaForCausalLM", graphs={name: []})


@pytest.mark.parametrize("infos, error", [
    ("input_ids", "must be a list"),
    ([["input_ids", [1, 8]]], "is \\(name, shape, dtype\\)"),
    ([["input_ids", [1, -8], "int64"]], "shape must be a list of ints >= 0"),
    ([["input_ids", [1, True], "int64"]], "shape must be a list of ints >= 0"),
    ([["input_ids", "1x8", "int64"]], "shape must be a list of ints >= 0"),
    ([["input_ids", [1, 8], 64]], "dtype must be a str"),
])
def test_graph_input_infos_are_type_checked(infos, error):
    with pytest.raises((ValueError, TypeError), match=error):
        Cfg().with_compiled(cls_name="RBLNLlamaForCausalLM", graphs={"prefill": infos})


def test_saved_config_has_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = Cfg().save(tmp_path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


# --- frozen, runtime vs compile-time options ----------------------------------------------------------


def test_config_is_frozen():
    config = Cfg(batch_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.device = 1
    with pytest.raises(TypeError):
        config.graphs["prefill"] = ()  # read-only mapping


def test_runtime_options_may_change_at_load():
    config = finalized(batch_size=2, max_seq_len=4096)
    changed = config.with_runtime_options(device=3, create_runtimes=False, activate_profiler=True)
    assert (changed.device, changed.create_runtimes, changed.activate_profiler) == (3, False, True)
    assert changed.compile_options == config.compile_options
    assert config.device is None  # the original is untouched


def test_compile_options_are_fixed_at_load():
    config = finalized(batch_size=4, max_seq_len=4096, decoder_batch_sizes=[1, 4])
    with pytest.raises(ValueError, match="rbln_batch_size is fixed at compile time.*export=True"):
        config.with_runtime_options(batch_size=2)
    with pytest.raises(ValueError, match="rbln_dtype is fixed at compile time"):
        config.with_runtime_options(dtype="float16")
    with pytest.raises(ValueError, match="rbln_max_seq_len is fixed at compile time"):
        config.with_runtime_options(max_seq_len=2048)  # would also break the block rule: still "fixed"
    # The compiled value (in any spelling) is fine, and so is None ("not given").
    same = config.with_runtime_options(batch_size=4, decoder_batch_sizes=[4, 1], max_seq_len=None, device=1)
    assert same.device == 1 and same.batch_size == 4
    with pytest.raises(ValueError, match="rbln_batch_sise"):
        config.with_runtime_options(batch_sise=4)


def test_from_compiled_applies_runtime_kwargs(tmp_path):
    finalized(batch_size=2, max_seq_len=4096).save(tmp_path)
    config, remaining = Cfg.from_compiled(tmp_path, {"rbln_device": 1, "rbln_batch_size": 2, "token": "x"})
    assert config.device == 1 and remaining == {"token": "x"}
    with pytest.raises(ValueError, match="rbln_batch_size is fixed at compile time"):
        Cfg.from_compiled(tmp_path, {"rbln_config": {"batch_size": 8}})
    # A config object counts only for the options it sets away from the defaults.
    config, _ = Cfg.from_compiled(tmp_path, {"rbln_config": Cfg(create_runtimes=False)})
    assert config.create_runtimes is False and config.batch_size == 2


# --- JSON -------------------------------------------------------------------------------------------


GRAPHS = {
    "prefill": [("input_ids", [1, 128], "int64"), ("cache_position", (1, 128), "int32")],
    "decoder_batch_4": [("input_ids", (4, 1), "int64")],
}


def test_json_round_trip(tmp_path):
    config = finalized(batch_size=4, max_seq_len=16384, kvcache_partition_len=4096, decoder_batch_sizes=[1, 2, 4],
                       tensor_parallel_size=2, device=[0, 1], dtype="float16")
    config = config.with_compiled(cls_name="RBLNLlamaForCausalLM", graphs=GRAPHS)
    path = config.save(tmp_path)
    assert path == os.path.join(tmp_path, CONFIG_NAME)
    assert os.listdir(tmp_path) == [CONFIG_NAME]  # no temporary file left behind

    data = json.loads(open(path).read())
    assert data["cls_name"] == "RBLNLlamaForCausalLM"
    assert data["config_cls"] == "RBLNLlamaForCausalLMConfig"
    assert isinstance(data["optimum_npu_version"], str)
    assert data["compile_options"]["decoder_batch_sizes"] == [4, 2, 1]
    assert data["runtime_options"] == {}   # chosen at each load, never saved
    assert data["graphs"]["prefill"] == [["input_ids", [1, 128], "int64"], ["cache_position", [1, 128], "int32"]]

    config = dataclasses.replace(config, device=None)   # what a load starts from
    assert Cfg.load(tmp_path) == config
    assert RBLNModelConfig.load(tmp_path) == config  # the base resolves the subclass by name
    assert type(RBLNDecoderOnlyModelForCausalLMConfig.load(tmp_path)) is Cfg


def test_load_refuses_other_config_class(tmp_path):
    finalized(max_seq_len=4096).save(tmp_path)
    with pytest.raises(ValueError, match="RBLNLlamaForCausalLMConfig.*not a RBLNQwen2ForCausalLMConfig"):
        RBLNQwen2ForCausalLMConfig.load(tmp_path)


def test_load_refuses_unknown_class_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="export=True"):
        Cfg.load(tmp_path)
    finalized(max_seq_len=4096).save(tmp_path)
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "config_cls": "RBLNNoSuchConfig"}))
    with pytest.raises(ValueError, match="RBLNNoSuchConfig"):
        RBLNModelConfig.load(tmp_path)


def test_config_class_names_are_unique():
    with pytest.raises(TypeError, match="already registered"):

        class RBLNLlamaForCausalLMConfig(RBLNModelConfig):  # noqa: F811 - a second class of the same name
            pass


def test_registry_holds_the_config_classes():
    for cls in (RBLNModelConfig, RBLNDecoderOnlyModelForCausalLMConfig, RBLNLlamaForCausalLMConfig,
                RBLNQwen2ForCausalLMConfig, RBLNMistralForCausalLMConfig):
        assert CONFIG_REGISTRY[cls.__name__] is cls


# --- decoder-only: defaults from the HF config ----------------------------------------------------------


def test_eager_defaults_from_hf_config():
    config = Cfg(batch_size=2).finalize(hf_config(max_position_embeddings=4096))
    assert config.is_resolved
    assert (config.max_seq_len, config.attn_impl, config.kvcache_partition_len) == (4096, "eager", None)
    assert config.kvcache_block_size == 4096          # one block per sequence
    assert config.kvcache_num_blocks == 2             # one block per batch slot
    assert config.decoder_batch_sizes == (2,)
    assert (config.prefill_chunk_size, config.use_inputs_embeds, config.use_attention_mask) == (128, False, False)
    assert config.finalize(hf_config(4096)) == config  # idempotent


def test_partition_len_selects_flash():
    config = finalized(batch_size=2, max_seq_len=16384, kvcache_partition_len=8192)
    assert config.attn_impl == "flash_attn"
    assert config.kvcache_block_size == 8192
    assert config.kvcache_num_blocks == 2 * 16384 // 8192  # every slot at full length


def test_flash_without_partition_defaults_to_4096():
    config = finalized(max_seq_len=8192, attn_impl="flash_attn")
    assert (config.kvcache_partition_len, config.kvcache_block_size) == (4096, 4096)
    # A given block size is the partition length.
    config = finalized(max_seq_len=16384, attn_impl="flash_attn", kvcache_block_size=8192)
    assert config.kvcache_partition_len == 8192


def test_decoder_batch_sizes_sorted_deduplicated_and_kept_as_given():
    assert Cfg(batch_size=8, decoder_batch_sizes=[1, 8, 4, 4]).decoder_batch_sizes == (8, 4, 1)
    assert Cfg(batch_size=8, decoder_batch_sizes=[2, 1]).decoder_batch_sizes == (2, 1)  # no batch_size added
    with pytest.raises(ValueError, match="rbln_decoder_batch_sizes"):
        Cfg(batch_size=4, decoder_batch_sizes=[8])
    with pytest.raises(ValueError, match="rbln_decoder_batch_sizes"):
        Cfg(batch_size=4, decoder_batch_sizes=[0])
    with pytest.raises(TypeError, match="rbln_decoder_batch_sizes"):
        Cfg(batch_size=4, decoder_batch_sizes=[])


# --- decoder-only: validation rules --------------------------------------------------------------------


def test_eager_max_seq_len_limit():
    with pytest.raises(ValueError, match="rbln_max_seq_len=65536 is above 32768"):
        finalized(max_seq_len=65536)
    # The HF default can trip it too; the message says how to get out.
    with pytest.raises(ValueError, match="rbln_kvcache_partition_len"):
        Cfg().finalize(hf_config(131072))


def test_eager_block_size_must_equal_max_seq_len():
    with pytest.raises(ValueError, match="rbln_kvcache_block_size=1024 must equal rbln_max_seq_len=4096"):
        finalized(max_seq_len=4096, kvcache_block_size=1024)


def test_flash_partition_len_range():
    with pytest.raises(ValueError, match="rbln_kvcache_partition_len must be between 4096 and 32768"):
        Cfg(kvcache_partition_len=2048)
    with pytest.raises(ValueError, match="rbln_kvcache_partition_len must be between 4096 and 32768"):
        Cfg(kvcache_partition_len=65536)


def test_flash_max_seq_len_at_least_8192():
    with pytest.raises(ValueError, match="rbln_max_seq_len=4096 is below 8192"):
        finalized(max_seq_len=4096, kvcache_partition_len=4096)


def test_flash_max_seq_len_multiple_of_partition():
    with pytest.raises(ValueError, match="rbln_max_seq_len=10240 must be a multiple of rbln_kvcache_partition_len"):
        finalized(max_seq_len=10240, kvcache_partition_len=4096)


def test_flash_max_seq_len_at_least_two_partitions():
    with pytest.raises(ValueError, match="rbln_max_seq_len=8192 must be at least 2 \\* rbln_kvcache_partition_len"):
        finalized(max_seq_len=8192, kvcache_partition_len=8192)


def test_flash_block_size_must_equal_partition():
    with pytest.raises(ValueError, match="rbln_kvcache_block_size=8192 must equal rbln_kvcache_partition_len=4096"):
        finalized(max_seq_len=16384, kvcache_partition_len=4096, kvcache_block_size=8192)


def test_eager_with_partition_len_is_an_error():
    with pytest.raises(ValueError, match="rbln_kvcache_partition_len=4096 needs flash attention"):
        Cfg(attn_impl="eager", kvcache_partition_len=4096)


def test_attn_impl_values():
    with pytest.raises(ValueError, match="rbln_attn_impl must be one of None, 'eager', 'flash_attn'"):
        Cfg(attn_impl="sdpa")


def test_num_blocks_at_least_batch_size():
    with pytest.raises(ValueError, match="rbln_kvcache_num_blocks=3 is less than rbln_batch_size=4"):
        finalized(batch_size=4, max_seq_len=4096, kvcache_num_blocks=3)
    with pytest.raises(ValueError, match="rbln_kvcache_num_blocks=1 is less than rbln_batch_size=2"):
        finalized(batch_size=2, max_seq_len=16384, kvcache_partition_len=4096, kvcache_num_blocks=1)
    # Fewer than the full-length need is fine with flash: slots share a pool of blocks.
    shared = finalized(batch_size=2, max_seq_len=16384, kvcache_partition_len=4096, kvcache_num_blocks=3)
    assert shared.kvcache_num_blocks == 3


def test_max_seq_len_within_max_position_embeddings():
    with pytest.raises(ValueError, match="rbln_max_seq_len=8192 is above the model's max_position_embeddings=4096"):
        Cfg(max_seq_len=8192).finalize(hf_config(4096))


def test_prefill_chunk_size_rules():
    assert Cfg(prefill_chunk_size=256).prefill_chunk_size == 256
    with pytest.raises(ValueError, match="rbln_prefill_chunk_size must be a multiple of 64"):
        Cfg(prefill_chunk_size=100)
    with pytest.raises(ValueError, match="rbln_prefill_chunk_size"):
        Cfg(prefill_chunk_size=0)
    with pytest.raises(ValueError, match="rbln_prefill_chunk_size=256 must be <= rbln_max_seq_len=128"):
        finalized(max_seq_len=128, prefill_chunk_size=256)


def test_bool_options():
    with pytest.raises(TypeError, match="rbln_use_inputs_embeds"):
        Cfg(use_inputs_embeds="true")
    with pytest.raises(TypeError, match="rbln_use_attention_mask"):
        Cfg(use_attention_mask=None)


def test_rules_run_again_on_load(tmp_path):
    finalized(max_seq_len=4096).save(tmp_path)
    path = tmp_path / CONFIG_NAME
    data = json.loads(path.read_text())
    data["compile_options"]["kvcache_block_size"] = 1024  # hand-edited into an invalid combination
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rbln_kvcache_block_size"):
        Cfg.load(tmp_path)


# --- decoder-only: KV blocks from free memory ---------------------------------------------------------------


def test_resolve_num_blocks():
    config = finalized(batch_size=4, max_seq_len=16384, kvcache_partition_len=4096)
    assert config.blocks_for_full_length == 16
    assert config.resolve_num_blocks(free_bytes_per_device=100 * 1000, bytes_per_block=1000) == 16  # all fit
    assert config.resolve_num_blocks(free_bytes_per_device=10 * 1000 + 999, bytes_per_block=1000) == 10
    with pytest.raises(ValueError, match="does not fit.*rbln_batch_size=4"):
        config.resolve_num_blocks(free_bytes_per_device=3 * 1000, bytes_per_block=1000)
    with pytest.raises(RuntimeError, match="finalize"):
        Cfg().resolve_num_blocks(10, 1)


def test_family_configs_are_thin_subclasses():
    for cls in (RBLNLlamaForCausalLMConfig, RBLNQwen2ForCausalLMConfig, RBLNMistralForCausalLMConfig):
        assert issubclass(cls, RBLNDecoderOnlyModelForCausalLMConfig)
        assert cls.option_names() == RBLNDecoderOnlyModelForCausalLMConfig.option_names()
    # Mistral's window is the model's own: the option only sizes a ring cache (cache_impl), unset by default
    assert RBLNMistralForCausalLMConfig().sliding_window is None
