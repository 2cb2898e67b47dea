"""Device memory per compiled component and a placement of a pipeline's components on a server."""

import pytest
import torch
from diffusers import AutoencoderKLCosmos, CosmosTransformer3DModel
from transformers import T5Config, T5EncoderModel

from optimum_npu.diffusers.pipelines.cosmos import RBLNCosmosTextToWorldPipeline
from optimum_npu.diffusers.placement import ComponentMemory, component_memory, place_components
from optimum_npu.sim_device.specs import get_npu_spec

GiB = 1 << 30


def test_tensor_parallel_components_stay_on_one_card_and_everything_fits():
    usable = get_npu_spec("RBLN-CA25").usable_dram_bytes
    memory = {
        "text_encoder": ComponentMemory(int(0.9 * usable), 1, "RBLN-CA25"),
        "transformer": ComponentMemory(int(0.8 * usable), 4, "RBLN-CA25"),
        "vae": ComponentMemory(int(0.3 * usable), 1, "RBLN-CA25"),
        "safety_checker": ComponentMemory(int(0.5 * usable), 1, "RBLN-CA25"),
    }
    placement = place_components(memory, "RBLN-CA25", num_devices=8)
    assert placement["transformer"] == (0, 1, 2, 3)  # the largest first, one whole card
    assert placement["text_encoder"] == (4,) and placement["safety_checker"] == (5,)
    assert placement["vae"] == (5,)  # first fit: shares device 5 with the checker (0.5 + 0.3 of it)
    with pytest.raises(ValueError, match="transformer needs .* does not fit on the 3"):
        place_components(memory, "RBLN-CA25", num_devices=3)


def test_components_compiled_on_meta_report_their_memory():
    with torch.device("meta"):
        models = {
            "text_encoder": T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                    num_heads=4)),
            "transformer": CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                    attention_head_dim=12, num_layers=1, text_embed_dim=32,
                                                    adaln_lora_dim=4, max_size=(4, 16, 16)),
            "vae": AutoencoderKLCosmos(latent_channels=4, encoder_block_out_channels=(8, 8, 16, 16),
                                       decode_block_out_channels=(8, 8, 16, 16), attention_resolutions=(8,),
                                       resolution=32, num_layers=1, patch_size=2, spatial_compression_ratio=4,
                                       temporal_compression_ratio=4, latents_mean=None, latents_std=None),
        }
    compiled = RBLNCosmosTextToWorldPipeline.compile_components(
        models, rbln_create_runtimes=False,
        rbln_config={"height": 16, "width": 16, "num_frames": 9, "max_seq_len": 16, "vae": {"batch_size": 2}})
    memory = component_memory(compiled)
    transformer_weights = sum(p.numel() for p in models["transformer"].parameters()) * 2  # bf16
    assert memory["transformer"].bytes_per_device > transformer_weights
    assert all(m.tensor_parallel_size == 1 for m in memory.values())
    assert place_components(memory, "RBLN-CA25", num_devices=1) == {"text_encoder": (0,), "transformer": (0,),
                                                                      "vae": (0,)}


@pytest.mark.heavy
def test_cosmos_7b_shaped_pipeline_is_placed_on_a_ca25_server():
    """Cosmos-Predict1-7B text-to-world at diffusers' defaults (121 frames of 704 x 1280, 512 tokens),
    compiled on the meta device: the transformer does not fit one device, at TP 4 it fits a card."""
    from optimum_npu.diffusers.placement import CA25_SERVER_DEVICES

    with torch.device("meta"):
        models = {
            "text_encoder": T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                                    num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")),
            "transformer": CosmosTransformer3DModel(),  # diffusers' defaults: Cosmos-1.0-Diffusion-7B
            "vae": AutoencoderKLCosmos(),               # Cosmos-1.0-Tokenizer-CV8x8x8
        }
    compiled = RBLNCosmosTextToWorldPipeline.compile_components(
        models, rbln_create_runtimes=False, rbln_config={"transformer": {"tensor_parallel_size": 4}})
    assert compiled["transformer"].rbln_config.sample_size == (16, 88, 160)  # 121 x 704 x 1280 through 8x8x8
    memory = component_memory(compiled)
    usable = get_npu_spec("RBLN-CA25").usable_dram_bytes
    weights = sum(p.numel() for p in models["transformer"].parameters()) * 2
    # 13.5 GiB of weights + 3 GiB of activations do not fit one 15.7 GiB device; a quarter of the weights does
    assert weights / 4 < memory["transformer"].bytes_per_device < usable < weights + memory["transformer"].bytes_per_device
    placement = place_components(memory, "RBLN-CA25", CA25_SERVER_DEVICES)
    assert placement["transformer"] == (0, 1, 2, 3)
    per_device = {}
    for name, devices in placement.items():
        for d in devices:
            per_device[d] = per_device.get(d, 0) + memory[name].bytes_per_device
    assert max(per_device.values()) <= usable
