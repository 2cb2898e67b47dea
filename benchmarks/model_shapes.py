"""The model configurations the benchmarks share, each from its public config.json (architecture
only: the benchmarks build them on the meta device or with random weights)."""

from __future__ import annotations

from transformers import LlamaConfig


def llama3_config(size: str, torch_dtype: str = "bfloat16") -> LlamaConfig:
    """meta-llama/Meta-Llama-3-8B or -70B (`size` "8b" / "70b")."""
    shapes = {
        "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
        "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    }
    if size not in shapes:
        raise ValueError(f"size must be one of {sorted(shapes)}, got {size!r}")
    return LlamaConfig(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype=torch_dtype, **shapes[size])


def llama_125m_config() -> LlamaConfig:
    """The host-speed benchmarks' small Llama: ~125M parameters, 12 layers of hidden 768, GQA 12 query /
    4 KV heads, untied 32k vocabulary."""
    return LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
