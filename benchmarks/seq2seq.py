"""Encoder-decoder models at real sizes: simulated encoder time, decoder step time and device memory.

    python benchmarks/seq2seq.py [--batch 1] [--npu RBLN-CA25]

Each model is built on the meta device from its published shapes (no weights are materialised)
and its two graphs compiled as `from_pretrained(export=True)` compiles them (the encoder graph,
which also fills the cross-attention cache, and the decoder graph of one token per row), in
bf16. Columns: the encoder's time for one batch, the first and the last decoder step of a
`--tokens`-token generation (the self-attention kernel reads the positions written so far; T5's
dense path reads all `dec_max_seq_len` at every step), the time to generate them (encoder + every
step), and the device memory of the model: both programs' weights and caches, the shared ones
(embedding, cross-attention cache) once, plus each program's activations.
"""

from __future__ import annotations

import argparse

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from optimum_npu import (
    RBLNBartForConditionalGeneration,
    RBLNT5ForConditionalGeneration,
    RBLNWhisperForConditionalGeneration,
    compile_from_torch,
)
from optimum_npu.modeling.seq2seq.modeling_seq2seq import device_bytes

MODELS = {
    # name: (RBLN class, HF class, HF config, rbln options)
    "whisper-large-v3": (RBLNWhisperForConditionalGeneration, WhisperForConditionalGeneration, WhisperConfig(
        vocab_size=51866, num_mel_bins=128, encoder_layers=32, decoder_layers=32, d_model=1280,
        encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120,
        max_source_positions=1500, max_target_positions=448), {}),
    "t5-base": (RBLNT5ForConditionalGeneration, T5ForConditionalGeneration, T5Config(
        vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12, num_heads=12),
        {"enc_max_seq_len": 512, "dec_max_seq_len": 128}),
    "bart-large": (RBLNBartForConditionalGeneration, BartForConditionalGeneration, BartConfig(
        vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024),
        {"dec_max_seq_len": 128}),
}


def compile_on_meta(rbln_class, hf_class, hf_config, options: dict):
    """(final config, {graph name: CompiledModel}) of the model compiled on the meta device."""
    config, _ = rbln_class.config_class.from_kwargs({f"rbln_{k}": v for k, v in options.items()})
    with torch.device("meta"):
        hf_model = hf_class(hf_config)
        config = rbln_class._resolve_config(hf_model, config)
        specs = rbln_class._graph_specs(hf_model, config)
    return config, {spec.name: compile_from_torch(spec.module, input_info=list(spec.input_info), npu=config.npu,
                                                  dtype=config.dtype, cache=False) for spec in specs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--npu", default="RBLN-CA25")
    args = parser.parse_args()
    print(f"{args.npu}, bf16, batch {args.batch}; simulated")
    print(f"| model | enc / dec max len | encoder | decoder step 1 / {args.tokens} | encoder + "
          f"{args.tokens} steps | GiB |\n|---|---|---|---|---|---|")
    for name, (rbln_class, hf_class, hf_config, options) in MODELS.items():
        config, graphs = compile_on_meta(rbln_class, hf_class, hf_config,
                                         {**options, "batch_size": args.batch, "npu": args.npu})
        encoder_s = graphs["encoder"].estimate().total_s
        # Step k of the decoder attends over k positions (the paged kernel's price; T5's dense path: all).
        steps_s = [graphs["decoder"].estimate(kv_len=k).total_s for k in range(1, args.tokens + 1)]
        memory = device_bytes(graphs["encoder"].program, graphs["decoder"].program) / 2**30
        print(f"| {name} | {config.enc_max_seq_len} / {config.dec_max_seq_len} | {encoder_s * 1e3:.1f} ms | "
              f"{steps_s[0] * 1e3:.2f} / {steps_s[-1] * 1e3:.2f} ms | {(encoder_s + sum(steps_s)) * 1e3:.0f} ms | "
              f"{memory:.2f} |")


if __name__ == "__main__":
    main()
