"""Which RBLN class serves a checkpoint does not depend on what the process imported before.

The lookups (`RBLNAuto*`, a generic class's families, the "use RBLN..." advice of a refused
export, the class a compiled folder names) go through the static table `optimum_npu.MODEL_TYPES`.
The order-dependent cases run in a fresh interpreter, where nothing but the class under test
has been imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import optimum_npu
from optimum_npu.modeling.base import RBLNModel

ROOT = Path(__file__).resolve().parent.parent


def run_fresh(code: str, tmp_path) -> str:
    """Run `code` in a new interpreter (offline, this checkout first on the path); returns stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_table_names_every_class_under_its_own_model_type():
    classes = {name: getattr(optimum_npu, name) for name in optimum_npu.__all__}
    families = {name: c for name, c in classes.items()
                if isinstance(c, type) and issubclass(c, RBLNModel) and c.hf_model_type() is not None}
    listed = [name for names in optimum_npu.MODEL_TYPES.values() for name in names]
    assert sorted(listed) == sorted(families)
    for model_type, names in optimum_npu.MODEL_TYPES.items():
        assert all(families[name].hf_model_type() == model_type for name in names), model_type


def test_the_advice_of_a_refused_export_is_the_same_in_a_fresh_process(tmp_path):
    out = run_fresh("""
        from transformers import BertConfig
        from optimum_npu import RBLNLlamaForCausalLM
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained("bert")
        try:
            RBLNLlamaForCausalLM.from_pretrained("bert", export=True, rbln_create_runtimes=False)
        except ValueError as err:
            print(err)
    """, tmp_path)
    assert "model_type 'bert': use RBLNBertModel" in out


def test_auto_classes_find_every_family_in_a_fresh_process(tmp_path):
    out = run_fresh("""
        from transformers import BertConfig, SiglipVisionConfig
        from optimum_npu import RBLNAutoModel, RBLNAutoModelForTextEncoding
        from optimum_npu.cosmos_guardrail.face_blur import RetinaFaceConfig
        print(RBLNAutoModel.class_for_config(SiglipVisionConfig()).__name__)
        print(RBLNAutoModel.class_for_config(RetinaFaceConfig()).__name__)
        print(RBLNAutoModelForTextEncoding.class_for_config(BertConfig()).__name__)
    """, tmp_path)
    assert out.split() == ["RBLNSiglipVisionModel", "RBLNRetinaFace", "RBLNBertModel"]


def test_the_decoder_base_class_knows_its_families_in_a_fresh_process(tmp_path):
    out = run_fresh("""
        from optimum_npu.modeling.decoderonly.modeling_decoderonly import RBLNDecoderOnlyModelForCausalLM
        print(" ".join(sorted(RBLNDecoderOnlyModelForCausalLM._model_types())))
    """, tmp_path)
    assert out.split() == ["gemma2", "gemma3_text", "gpt2", "llama", "mistral", "mixtral", "opt", "phi3", "qwen2",
                           "qwen3", "qwen3_moe"]
