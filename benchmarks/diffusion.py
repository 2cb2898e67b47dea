"""Diffusion pipelines: host wall time vs diffusers, and simulated device time of real-sized configurations.

    python benchmarks/diffusion.py [--parts host device] [--repeats 2]

`host`: the tiny Stable Diffusion and Cosmos text-to-world pipelines of `optimum_npu.testing`,
ours (compiled, bf16 device numerics) vs diffusers' own pipeline on the same weights, same
prompt, seed and steps, on this CPU (fp32, diffusers' default). Best of `--repeats` after a
warm-up; the ratio ours / diffusers (< 1: ours faster). Compile time is reported apart.

`device`: simulated device time per denoising step and per generation of real-sized
configurations compiled on the meta device (no weights, nothing runs: the compiler's memory
plan and cost model), each component on one RBLN-CA25 device:
- SD-1.5-shaped: CLIP ViT-L/14 text encoder (77 tokens), UNet (320..1280 channels, cross
  attention 768, batch 2 for classifier-free guidance), VAE decoder, 512 x 512;
- Cosmos-Predict1-7B-shaped: T5-XXL encoder (512 tokens), the 7B transformer (28 blocks, hidden
  4096; two calls per step for guidance), the 8x8x8 video VAE decoder, 121 frames of 704 x 1280.
A component that does not fit one device is marked so, with its time as if it ran on one; the
Cosmos transformer is also compiled at tensor_parallel_size=4 (one ATOM-Max card; the note
counts its collectives per call: per block one all-reduce after each attention and the MLP, and
one after each of the three small adaLN modulations, [batch, 3 x hidden]). The fitting
components of each pipeline are then placed on an RBLN-CA25 server (32 devices).
"""

from __future__ import annotations

import argparse
import time
import types

import torch
import torch.nn.functional as F

from optimum_npu.compile import CompiledModel
from optimum_npu.compile.compiler import ProgramTooLargeError
from optimum_npu.diffusers.placement import CA25_SERVER_DEVICES, component_memory, place_components
from optimum_npu.sim_device.stats import format_bytes
from optimum_npu.sim_device.program import StepKind

PROMPT = "a robot arm lifts a red cube"


def _best_of(repeats: int, run) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def host_rows(repeats: int, folder) -> list[tuple[str, float, float, float, float]]:
    from diffusers import CosmosTextToWorldPipeline, StableDiffusionPipeline

    import diffusers.models.transformers.transformer_cosmos as upstream
    from optimum_npu import RBLNCosmosTextToWorldPipeline, RBLNStableDiffusionPipeline
    from optimum_npu.testing import build_tiny_cosmos, build_tiny_stable_diffusion

    # diffusers' reference Cosmos transformer resizes its padding mask with torchvision (absent
    # here): give it torchvision's NEAREST resize, F.interpolate(mode="nearest"). Ours needs none.
    upstream.transforms = types.SimpleNamespace(
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
        functional=types.SimpleNamespace(resize=lambda x, size, interpolation: F.interpolate(x, size, mode=interpolation)))

    class PassingChecker:  # the same stand-in guardrail on both sides (the guardrail is benchmarked apart)
        check_text_safety = staticmethod(lambda prompt: True)
        check_video_safety = staticmethod(lambda frames: frames)
        to = lambda self, *a, **k: self  # noqa: E731

    rows = []
    sd = build_tiny_stable_diffusion(folder / "sd", sample_size=32)
    cosmos = build_tiny_cosmos(folder / "cosmos")
    shape = {"height": 32, "width": 32, "num_frames": 9}
    cases = [
        ("tiny SD 32x32, 10 steps", StableDiffusionPipeline, RBLNStableDiffusionPipeline, sd,
         {"rbln_config": {"height": 32, "width": 32}}, {"num_inference_steps": 10}, {}),
        ("tiny Cosmos 9x32x32, 6 steps", CosmosTextToWorldPipeline, RBLNCosmosTextToWorldPipeline, cosmos,
         {"rbln_config": {**shape, "max_seq_len": 32}},
         {**shape, "fps": 24, "num_inference_steps": 6, "max_sequence_length": 32, "negative_prompt": "static"},
         {"safety_checker": PassingChecker()}),
    ]
    for name, theirs_class, ours_class, source, options, call, extra in cases:
        theirs = theirs_class.from_pretrained(source, **extra)
        started = time.perf_counter()
        ours = ours_class.from_pretrained(source, export=True, **options, **extra)
        compile_s = time.perf_counter() - started
        for pipe in (theirs, ours):
            pipe.set_progress_bar_config(disable=True)

        def run(pipe):
            return lambda: pipe(PROMPT, **call, generator=torch.Generator().manual_seed(0), output_type="np")

        theirs_s, ours_s = _best_of(repeats, run(theirs)), _best_of(repeats, run(ours))
        rows.append((name, ours_s, theirs_s, compile_s, ours.generation_stats.device_s))
    return rows


def _compile_meta(rbln_class, module, **options):
    """Compile `module` (meta) for one device; on a too-large program, its single-device time and
    the tensor-parallel size that would fit."""
    try:
        model = rbln_class.from_model(module, rbln_create_runtimes=False, **options)
    except ProgramTooLargeError as err:
        program = CompiledModel(program=err.program, tensors=None)
        need = max(err.program.memory.total_bytes(r) for r in range(err.program.memory.num_devices))
        tp = err.smallest_tensor_parallel_size
        fits = f"TP {tp} would fit" if tp else "no tensor-parallel size fits"
        return None, program.estimated_latency_s, format_bytes(need), f"too large for 1 device ({fits})"
    memory = component_memory({"model": model})["model"]
    tp = model.rbln_config.tensor_parallel_size
    collectives = sum(step.kind == StepKind.COLLECTIVE for g in model.graphs.values() for step in g.program.steps)
    note = f"TP {tp}, {collectives} collectives per call" if tp > 1 else ""
    return model, sum(g.estimated_latency_s for g in model.graphs.values()), str(memory), note


def device_rows():
    from diffusers import AutoencoderKL, AutoencoderKLCosmos, CosmosTransformer3DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from optimum_npu import (
        RBLNAutoencoderKL, RBLNAutoencoderKLCosmos, RBLNCLIPTextModel, RBLNCosmosTransformer3DModel, RBLNT5EncoderModel,
        RBLNUNet2DConditionModel,
    )

    rows = []
    with torch.device("meta"):
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD-1.5 shape
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                            sample_size=512)
    sd = [("text encoder", RBLNCLIPTextModel, clip, 2, {"rbln_max_seq_len": 77}),
          ("UNet (batch 2)", RBLNUNet2DConditionModel, unet, 50,
           {"rbln_batch_size": 2, "rbln_max_seq_len": 77, "rbln_sample_size": (64, 64)}),
          ("VAE decoder", RBLNAutoencoderKL, vae, 1, {"rbln_sample_size": (512, 512)})]
    with torch.device("meta"):
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                     num_heads=64, feed_forward_proj="gated-gelu"))  # T5-XXL (v1.1) encoder
        transformer = CosmosTransformer3DModel()   # diffusers' defaults are Cosmos-1.0-Diffusion-7B's
        cosmos_vae = AutoencoderKLCosmos()         # and Cosmos-1.0-Tokenizer-CV8x8x8's
    cosmos = [("text encoder", RBLNT5EncoderModel, t5, 2, {"rbln_max_seq_len": 512}),
              ("transformer (x2 per step)", RBLNCosmosTransformer3DModel, transformer, 2 * 36,
               {"rbln_max_seq_len": 512, "rbln_sample_size": (16, 88, 160)}),
              ("transformer TP 4 (x2)", RBLNCosmosTransformer3DModel, transformer, 2 * 36,
               {"rbln_max_seq_len": 512, "rbln_sample_size": (16, 88, 160),
                "rbln_tensor_parallel_size": 4}),
              ("VAE decoder", RBLNAutoencoderKLCosmos, cosmos_vae, 1, {"rbln_sample_size": (121, 704, 1280)})]
    placements = {}
    for pipeline, parts in (("SD-1.5 512x512, 50 steps", sd), ("Cosmos-7B 121x704x1280, 36 steps", cosmos)):
        compiled = {}
        for name, rbln_class, module, calls, options in parts:
            model, seconds, memory, note = _compile_meta(rbln_class, module, **options)
            rows.append((pipeline, name, calls, seconds, memory, note, model is not None))
            if model is not None:
                compiled[name.split(" (")[0].split(" TP")[0]] = model  # the TP 4 transformer replaces the TP 1 one
        placements[pipeline] = place_components(component_memory(compiled), "RBLN-CA25", CA25_SERVER_DEVICES)
    return rows, placements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["host", "device"], choices=["host", "device"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if "host" in args.parts:
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            rows = host_rows(args.repeats, Path(tmp))
        print(f"\n{'host wall time per generation':<32} {'ours':>9} {'diffusers':>10} {'ours/diffusers':>15} "
              f"{'compile':>9} {'simulated device':>17}")
        for name, ours_s, theirs_s, compile_s, device_s in rows:
            print(f"{name:<32} {ours_s:>8.2f}s {theirs_s:>9.2f}s {ours_s / theirs_s:>14.2f}x {compile_s:>8.1f}s "
                  f"{device_s * 1e3:>14.3f} ms")
    if "device" in args.parts:
        rows, placements = device_rows()
        print(f"\n{'simulated device time (meta, RBLN-CA25, bf16)':<34} {'component':<26} {'per call':>10} "
              f"{'calls':>6} {'total':>10} {'memory':>10}  note")
        totals: dict[str, float] = {}
        for pipeline, name, calls, seconds, memory, note, fits in rows:
            totals[pipeline] = totals.get(pipeline, 0.0) + (calls * seconds if fits else 0.0)
            print(f"{pipeline:<34} {name:<26} {seconds * 1e3:>8.2f}ms {calls:>6} {calls * seconds:>9.3f}s "
                  f"{memory:>10}  {note}")
        for pipeline, total in totals.items():  # the components that fit (too-large rows are left out)
            print(f"{pipeline:<34} {'whole generation':<26} {'':>10} {'':>6} {total:>9.3f}s")
        for pipeline, placement in placements.items():
            print(f"placement on an RBLN-CA25 server ({CA25_SERVER_DEVICES} devices), {pipeline}: "
                  + ", ".join(f"{name} -> {list(devices)}" for name, devices in placement.items()))


if __name__ == "__main__":
    main()
