"""The Cosmos guardrail: simulated device time of each sub-model at its real shape, and host
wall time of the whole checker vs the same computation in plain torch / transformers.

    python benchmarks/guardrail.py [--frames 121] [--repeats 3]

1. Real shapes on the meta device (sizes and costs only, nothing runs): RetinaFace-ResNet-50 on
   704 x 1280 frames, SigLIP-so400m/14 at 384 x 384, the safety MLP (1152 -> 7), and the
   Llama-Guard-3-8B decoder at tensor parallelism 2 (16 GB of bf16 weights do not fit one 16 GiB
   device): a ~400-token moderation prompt in 128-token prefill chunks, then 3 decode steps
   ("safe" + end of turn). The compiled programs' estimates (`CompiledModel.estimated_latency_s`;
   the decoder's attention priced at the full 2048-position KV length, an upper bound) per call
   and per video (every frame for faces, every 12th for content), and device memory per device.
   The 8B decoder takes a minute or two to compile on the meta device.
2. Host wall time on tiny random components (`optimum_npu.testing.build_tiny_cosmos_guardrail`):
   `check_text_safety` and `check_video_safety` of the compiled checker (video sub-models at 4
   frames per run) vs the reference (the
   same models in fp32 torch / transformers, the same host pre- and post-processing), best of
   `--repeats`, as a ratio.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from optimum_npu.compile import compile_from_torch
from optimum_npu.cosmos_guardrail import RBLNCosmosSafetyChecker
from optimum_npu.cosmos_guardrail.face_blur import (
    RetinaFaceConfig,
    RetinaFaceModel,
    anchor_priors,
    blur_boxes,
    decode_boxes,
    frames_to_detector_input,
    select_faces,
)
from optimum_npu.cosmos_guardrail.guard_llm import moderation_prompt
from optimum_npu.cosmos_guardrail.video_filter import (
    VideoSafetyConfig,
    VideoSafetyModel,
    load_video_safety_model,
    sampled_frames,
)
from optimum_npu.testing import build_tiny_cosmos_guardrail

MIB = 2**20
FRAME_STRIDE = 12


def real_shapes(frames: int) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    rows = []
    with torch.device("meta"):
        retinaface = RetinaFaceModel(RetinaFaceConfig()).eval()
        siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                      num_attention_heads=16, image_size=384, patch_size=14)).eval()
        mlp = VideoSafetyModel(VideoSafetyConfig()).eval()
    sampled = len(sampled_frames(frames, FRAME_STRIDE))

    class Pooled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return self.model(pixel_values=pixel_values).pooler_output

    for name, module, info, calls in (
        ("face_blur_filter (RetinaFace-R50, 704x1280)", retinaface, [("pixel_values", [1, 3, 704, 1280], "float32")],
         frames),
        ("siglip_encoder (so400m/14, 384x384)", Pooled(siglip), [("pixel_values", [1, 3, 384, 384], "float32")],
         sampled),
        ("video_safety_model (MLP 1152->7)", mlp, [("embeddings", [1, 1152], "float32")], sampled),
    ):
        compiled = compile_from_torch(module, input_info=info)
        rows.append((name, compiled.estimated_latency_s, calls, compiled.device_bytes))

    from transformers import LlamaConfig

    from optimum_npu.planning.meta import compile_decoder_on_meta

    guard = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        rope_theta=500000.0, tie_word_embeddings=False)   # Llama-Guard-3-8B's shape (Llama 3.1 8B)
    _, graphs = compile_decoder_on_meta(guard, rbln_max_seq_len=2048, rbln_prefill_chunk_size=128,
                                        rbln_tensor_parallel_size=2)
    prompt_tokens, answer_tokens = 400, 3
    seconds = (math.ceil(prompt_tokens / 128) * graphs["prefill"].estimated_latency_s
               + answer_tokens * graphs["decoder_batch_1"].estimated_latency_s)
    rows.append((f"llamaguard3 (8B, TP 2; {prompt_tokens}-token prompt + {answer_tokens} tokens)", seconds, 1,
                 graphs["prefill"].device_bytes))

    print(f"\n1. Simulated device time at real shapes (RBLN-CA25, bf16), a video of {frames} frames "
          f"({sampled} sampled for content)")
    print(f"{'sub-model':<58} {'per call ms':>12} {'calls':>6} {'per video ms':>13} {'MiB/device':>11}")
    for name, seconds, calls, nbytes in rows:
        print(f"{name:<58} {seconds * 1e3:>12.3f} {calls:>6} {seconds * calls * 1e3:>13.1f} {nbytes / MIB:>11.1f}")


def _best(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def host_time(repeats: int) -> None:
    from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, SiglipModel

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        source = build_tiny_cosmos_guardrail(Path(tmp) / "src", blocklist=["zorblax"])
        height, width = 64, 96
        # Frames per run of the video sub-models: 4 (at batch 1, the 25 detector runs' per-run host
        # overhead dominates the tiny convolutions).
        checker = RBLNCosmosSafetyChecker.from_pretrained(
            source, export=True, rbln_batch_size=4, rbln_config={"face_blur_filter": {"image_size": (height, width)}})
        video = np.random.default_rng(0).integers(0, 256, (25, height, width, 3), dtype=np.uint8)
        prompt = "a robot arm lifts a red cube"

        tokenizer = AutoTokenizer.from_pretrained(source / "llamaGuard3")
        guard = AutoModelForCausalLM.from_pretrained(source / "llamaGuard3").eval()
        siglip = SiglipModel.from_pretrained(source / "video_content_safety_filter" / "siglip_encoder").eval()
        processor = AutoImageProcessor.from_pretrained(source / "video_content_safety_filter" / "siglip_encoder")
        mlp = load_video_safety_model(source / "video_content_safety_filter" / "safety_filter")
        detector = RetinaFaceModel.from_pretrained(source / "face_blur_filter").eval()
        priors = anchor_priors(detector.config, height, width)

        def reference_text():
            ids = tokenizer(moderation_prompt(prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.inference_mode():
                guard.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)

        def reference_video():
            with torch.inference_mode():
                frames = [video[i] for i in sampled_frames(len(video), FRAME_STRIDE)]
                features = siglip.get_image_features(
                    pixel_values=processor(images=frames, return_tensors="pt")["pixel_values"]).pooler_output
                mlp(features / features.norm(dim=-1, keepdim=True)).argmax(-1)
                offsets, scores, _ = detector(frames_to_detector_input(video, height, width))
                boxes = decode_boxes(offsets, priors, detector.config.variances) * torch.tensor([width, height] * 2)
                [blur_boxes(f, select_faces(b, s)) for f, b, s in zip(video, boxes.numpy(), scores.numpy())]

        rows = [
            ("check_text_safety (blocklist + guard LLM)", _best(lambda: checker.check_text_safety(prompt), repeats),
             _best(reference_text, repeats)),
            (f"check_video_safety ({len(video)} frames {height}x{width})",
             _best(lambda: checker.check_video_safety(video), repeats), _best(reference_video, repeats)),
        ]
        checker.close()
    print(f"\n2. Host wall time on tiny components, best of {repeats} (ours: compiled, bf16 on the simulated "
          "device; reference: fp32 torch / transformers)")
    print(f"{'call':<45} {'ours ms':>9} {'reference ms':>13} {'ours / ref':>11}")
    for name, ours, reference in rows:
        print(f"{name:<45} {ours * 1e3:>9.1f} {reference * 1e3:>13.1f} {ours / reference:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=121, help="frames of the video (Cosmos-1.0: 121)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    real_shapes(args.frames)
    host_time(args.repeats)


if __name__ == "__main__":
    main()
