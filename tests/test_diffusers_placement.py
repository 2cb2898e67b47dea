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
        rbln_config={"height": 16, "width": 16, "num_frames": 9, "fps": 24, "max_seq_len": 16, "vae": {"batch_size": 2}})
    memory = component_memory(compiled)
    transformer_weights = sum(p.numel() for p in models["transformer"].parameters()) * 2  # bf16
    assert memory["transformer"].bytes_per_device > transformer_weights
    assert all(m.tensor_parallel_size == 1 for m in memory.values())
    assert place_components(memory, "RBLN-CA25", num_devices=1) == {"text_encoder": (0,), "transformer": (0,),
                                                                      "vae": (0,)}
