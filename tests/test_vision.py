"""Image classification on the single-graph base, against transformers, and the compiler's CNN
path (batch norm folding, conv + activation + residual fusion, convolution pricing).

Tiny random models of each family (ResNet, ConvNeXt, ViT, MobileNetV2) at 32x32, with random
batch-norm statistics so that folding them matters. Reference: the HF model in fp32.
Tolerances: exact numerics 1e-5 (fp32 summation order); bf16 device numerics within 5% of the
logits' scale, and the same top-1 wherever HF's top-2 margin is larger than that bound.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from llm_fixtures import _one_torch_thread  # noqa: F401  (module fixture)
from PIL import Image
from transformers import (
    ConvNextConfig,
    ConvNextForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    pipeline,
)
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

from optimum_npu import (
    RBLNAutoModel,
    RBLNAutoModelForImageClassification,
    RBLNConvNextForImageClassification,
    RBLNMobileNetV2ForImageClassification,
    RBLNModelForImageClassification,
    RBLNResNetForImageClassification,
    RBLNViTForImageClassification,
    compile_from_torch,
)
from optimum_npu.modeling import base

SIZE = 32
LABELS = {0: "red", 1: "green", 2: "blue", 3: "cyan", 4: "gray"}


def make(family: str):
    labels = dict(num_labels=5, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    model = {
        "resnet": lambda: ResNetForImageClassification(ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", **labels)),
        "convnext": lambda: ConvNextForImageClassification(ConvNextConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, **labels)),
        "vit": lambda: ViTForImageClassification(ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=SIZE,
            patch_size=8, **labels)),
        "mobilenet_v2": lambda: MobileNetV2ForImageClassification(MobileNetV2Config(
            depth_multiplier=0.35, image_size=SIZE, **labels)),
    }[family]()
    return with_trained_statistics(model)


def with_trained_statistics(model):
    """Batch-norm statistics as after training (not 0 / 1), so that folding them is not a no-op."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


# More families, each one line in image_classification.py: checked in exact numerics.
MORE_FAMILIES = {
    "regnet": lambda: transformers.RegNetForImageClassification(transformers.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=5)),
    "mobilenet_v1": lambda: transformers.MobileNetV1ForImageClassification(transformers.MobileNetV1Config(
        depth_multiplier=0.5, image_size=SIZE, num_labels=5)),
    "deit": lambda: transformers.DeiTForImageClassification(transformers.DeiTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=SIZE,
        patch_size=8, num_labels=5)),
    "swin": lambda: transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=5)),
    "convnextv2": lambda: transformers.ConvNextV2ForImageClassification(transformers.ConvNextV2Config(
        hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=5)),
    "dinov2": lambda: transformers.Dinov2ForImageClassification(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=SIZE,
        patch_size=8, num_labels=5)),
}


@pytest.mark.parametrize("family", list(MORE_FAMILIES))
def test_more_families_match_transformers_in_exact_numerics(family):
    hf = with_trained_statistics(MORE_FAMILIES[family]())
    model = RBLNAutoModelForImageClassification.from_model(hf, rbln_numerics="exact", **OPTIONS)
    assert type(model).hf_class is type(hf)
    x = images(3)
    out = model(x)
    with torch.no_grad():
        ref = hf(pixel_values=x)
    assert type(out) is type(ref) and ref.logits.abs().max() > 1e-3  # logits of a size that tells
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


FAMILIES = {"resnet": RBLNResNetForImageClassification, "convnext": RBLNConvNextForImageClassification,
            "vit": RBLNViTForImageClassification, "mobilenet_v2": RBLNMobileNetV2ForImageClassification}
OPTIONS = dict(rbln_batch_size=2, rbln_image_size=SIZE)


def images(count: int) -> torch.Tensor:
    return torch.randn(count, 3, SIZE, SIZE)


@pytest.mark.parametrize("numerics", ["exact", "device"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_top1_match_transformers(family, numerics):
    hf = make(family)
    model = RBLNModelForImageClassification.from_model(hf, rbln_numerics=numerics, **OPTIONS)
    assert type(model) is FAMILIES[family]  # the generic class picks the family
    x = images(5)  # 3 runs of the compiled batch of 2, the last one padded
    out = model(x)
    with torch.no_grad():
        ref = hf(pixel_values=x)
    assert type(out) is type(ref) and out.logits.shape == ref.logits.shape == (5, 5)
    if numerics == "exact":
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(out.logits.argmax(-1), ref.logits.argmax(-1))
    else:
        bound = 0.05 * ref.logits.abs().max().item()
        assert (out.logits - ref.logits).abs().max().item() <= bound
        top2 = ref.logits.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * bound
        assert torch.equal(out.logits.argmax(-1)[clear], ref.logits.argmax(-1)[clear])
    stats = model.inference_stats
    assert (stats.samples, stats.runs, stats.compiled_batch_size, stats.unit) == (5, 3, 2, "images")
    assert stats.latency_s > 0 and stats.samples_per_s == pytest.approx(5 / stats.device_s)
    assert stats.memory and stats.memory[0].weights_bytes > 0


def test_padded_and_split_batches_equal_single_calls():
    model = RBLNResNetForImageClassification.from_model(make("resnet"), **OPTIONS)
    x = images(3)
    together = model(x).logits
    for row in range(3):
        assert torch.equal(model(x[row : row + 1]).logits[0], together[row])


def save_checkpoint(folder, family="resnet"):
    make(family).save_pretrained(folder)
    ConvNextImageProcessorPil(size={"shortest_edge": SIZE}, crop_pct=1.0).save_pretrained(folder)
    return folder


def test_save_and_load_without_recompiling_with_the_image_processor(tmp_path, monkeypatch):
    source = save_checkpoint(tmp_path / "resnet")
    model = RBLNAutoModelForImageClassification.from_pretrained(source, export=True, rbln_batch_size=2)
    assert type(model) is RBLNResNetForImageClassification
    assert model.rbln_config.image_size == (SIZE, SIZE)  # from preprocessor_config.json
    x = images(3)
    before = model(x).logits
    compiled = model.save_pretrained(tmp_path / "compiled")
    assert (tmp_path / "compiled" / "preprocessor_config.json").read_bytes() == (source / "preprocessor_config.json").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("loading a compiled folder must not compile")

    monkeypatch.setattr(base, "compile_from_torch", refuse)
    for cls in (RBLNResNetForImageClassification, RBLNModelForImageClassification, RBLNAutoModel):
        loaded = cls.from_pretrained(compiled)
        assert type(loaded) is RBLNResNetForImageClassification
        assert torch.equal(loaded(x).logits, before)
        loaded.close()


def test_pipeline_on_a_pil_image(tmp_path):
    source = save_checkpoint(tmp_path / "resnet")
    hf = ResNetForImageClassification.from_pretrained(source)
    processor = ConvNextImageProcessorPil.from_pretrained(source)
    model = RBLNResNetForImageClassification.from_pretrained(source, export=True, rbln_numerics="exact")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    ours = pipeline("image-classification", model=model, image_processor=processor)(image)
    theirs = pipeline("image-classification", model=hf, image_processor=processor)(image)
    assert [r["label"] for r in ours] == [r["label"] for r in theirs] and set(ours[0]) == {"label", "score"}
    assert [r["score"] for r in ours] == pytest.approx([r["score"] for r in theirs], abs=1e-5)


def test_auto_model_dispatches_on_model_type_and_task(tmp_path):
    source = save_checkpoint(tmp_path / "vit", "vit")
    cls = RBLNAutoModel.class_for(source, export=True)
    assert cls is RBLNViTForImageClassification
    assert RBLNAutoModel.class_for(source, export=True, task="image-classification") is cls
    with pytest.raises(ValueError, match="model_type 'vit' is not supported by RBLNAutoModel"):
        RBLNAutoModel.class_for(source, export=True, task="text-generation")
    with pytest.raises(ValueError, match="task must be one of 'text-generation', .*'image-classification'.*; got 'translation'"):
        RBLNAutoModel.class_for(source, export=True, task="translation")


def test_bad_inputs_and_options_are_clear_errors(tmp_path):
    hf = make("resnet")
    with pytest.raises(ValueError, match="rbln_image_size is not set and cannot be inferred.*rbln_image_size=224"):
        RBLNResNetForImageClassification.from_model(hf)
    for bad in ("32", (32,), {"h": 32, "w": 32}, 0, (32, -1), True):
        with pytest.raises(TypeError, match="rbln_image_size must be an int, \\(height, width\\) or"):
            RBLNResNetForImageClassification.from_model(hf, rbln_image_size=bad)
    model = RBLNResNetForImageClassification.from_model(hf, rbln_batch_size=2, rbln_image_size={"height": 32, "width": 48})
    assert model.rbln_config.image_size == (32, 48)
    with pytest.raises(ValueError, match="images of 32x32 .* compiled for 3-channel images of 32x48 .*rbln_image_size=\\(32, 32\\)"):
        model(images(1))
    with pytest.raises(ValueError, match="pixel_values must be a float tensor \\[batch, 3, 32, 48\\]"):
        model(torch.zeros(1, 3, 32, 48, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no image"):
        model(torch.zeros(0, 3, 32, 48))
    with pytest.raises(TypeError, match="takes pixel_values only"):
        model(torch.zeros(1, 3, 32, 48), labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="RBLNResNetForImageClassification compiles model_type resnet.*'vit'"):
        RBLNResNetForImageClassification.from_model(make("vit"), **OPTIONS)
    folder = model.save_pretrained(tmp_path / "compiled")
    with pytest.raises(ValueError, match="rbln_image_size is fixed at compile time"):
        RBLNResNetForImageClassification.from_pretrained(folder, rbln_image_size=64)
    config = json.loads((tmp_path / "compiled" / "rbln_config.json").read_text())
    assert config["compile_options"]["image_size"] == [32, 48]


# ---- the compiler's CNN path, on plain torch modules ----------------------------------


class ConvBlock(torch.nn.Module):
    """conv (with bias) + batch norm + ReLU, then a residual conv + batch norm + add + ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=True), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.pool = torch.nn.MaxPool2d(2)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.pool(y)


def test_a_plain_cnn_folds_batch_norms_and_fuses_conv_activation_and_residual(tmp_path):
    module = ConvBlock().eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = compile_from_torch(module, example_inputs=[x], numerics="exact")
    kernels = [s.name for s in compiled.program.steps if s.kind == "kernel" and not s.name.startswith(("input", "output"))]
    assert kernels == ["conv2d+relu", "conv2d+add+relu", "max_pool2d"]
    assert not any("running" in w.name for w in compiled.program.weights)  # statistics folded away
    (pool,) = [s for s in compiled.program.steps if s.name == "max_pool2d"]
    assert pool.vector_flops == (2 * 8 * 8 * 8) * (2 * 2)  # a compare per element of each 2x2 window
    with compiled.create_runtime(activate_profiler=True) as runtime:
        torch.testing.assert_close(runtime.run(x), module(x), atol=1e-5, rtol=1e-5)
        trace = json.loads(open(runtime.save_trace(tmp_path / "trace.json")).read())
    names = {e["name"] for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert {"conv2d+relu", "conv2d+add+relu", "max_pool2d"} <= names and "batch_norm" not in names
    assert module.training is False and module.bn1.running_var.min() >= 0.5  # the module itself is untouched


def test_convolutions_are_priced_by_their_flops_and_bytes():
    conv = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False).eval()
    compiled = compile_from_torch(conv, example_inputs=[torch.randn(4, 16, 28, 28)])
    (step,) = [s for s in compiled.program.steps if s.name == "conv2d"]
    # Each of 4*32*28*28 outputs is a dot product of 16*3*3 pairs (2 FLOPs each); bf16 operands.
    assert step.flops == 2 * (4 * 32 * 28 * 28) * (16 * 3 * 3)
    assert step.bytes_read == 2 * (4 * 16 * 28 * 28 + 32 * 16 * 3 * 3)
    assert step.bytes_written == 2 * (4 * 32 * 28 * 28)
    # Four times the batch: four times the work and the activations, the weights once.
    bigger = compile_from_torch(conv, example_inputs=[torch.randn(16, 16, 28, 28)])
    (big,) = [s for s in bigger.program.steps if s.name == "conv2d"]
    assert big.flops == 4 * step.flops and big.bytes_read == 2 * (16 * 16 * 28 * 28 + 32 * 16 * 3 * 3)


def test_inplace_math_on_intermediates_compiles_and_device_state_writes_stay():
    class InPlace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("total", torch.zeros(4))

        def forward(self, x):
            y = x * 2
            y += 1                      # aten.add_ on an intermediate: made functional
            z = torch.flatten(y, 1)
            z.relu_()                   # in place on a view of an intermediate read no more
            self.total.copy_(self.total + z.sum(0)[:4])  # device state: stays in place
            return z

    module = InPlace()
    x = torch.randn(3, 2, 4)
    compiled = compile_from_torch(module, example_inputs=[x], numerics="exact")
    targets = [op.target for s in compiled.program.steps for op in s.ops]
    assert "aten.copy_.default" in targets
    assert "aten.add_.Tensor" not in targets and "aten.relu_.default" not in targets
    expected = torch.relu(torch.flatten(x * 2 + 1, 1))
    with compiled.create_runtime() as runtime:
        torch.testing.assert_close(runtime.run(x), expected)
        torch.testing.assert_close(runtime.run(x), expected)


def test_dtype_npu_and_runtime_options(tmp_path):
    hf = make("resnet")
    x = images(2)
    with torch.no_grad():
        ref = hf(pixel_values=x).logits
    fp16 = RBLNResNetForImageClassification.from_model(hf, rbln_dtype="float16", rbln_device=1, **OPTIONS)
    assert (fp16(x).logits - ref).abs().max().item() <= 0.01 * ref.abs().max().item()  # 11-bit mantissa
    assert [m.device for m in fp16.inference_stats.memory] == [1]
    assert fp16.graphs["model"].program.device_dtype == "float16"
    fp16.close()
    offline = RBLNResNetForImageClassification.from_model(hf, rbln_create_runtimes=False, rbln_npu="RBLN-CR03", **OPTIONS)
    assert offline.graphs["model"].program.npu == "RBLN-CR03"
    with pytest.raises(RuntimeError, match="rbln_create_runtimes=False"):
        offline(x)
    folder = offline.save_pretrained(tmp_path / "cr03")
    with pytest.raises(ValueError, match="RBLN-CR03"):  # this machine has only RBLN-CA25 devices
        RBLNResNetForImageClassification.from_pretrained(folder, rbln_device=0)


@pytest.mark.heavy
def test_resnet50_on_meta_runs_each_conv_block_as_one_kernel():
    """A ResNet-50 (no weights: meta device): every convolution carries its folded batch norm and
    its activation (or residual add + activation); the device stores conv weights and one bias
    per conv output channel, nothing of the batch norms' statistics."""
    with torch.device("meta"):
        hf = ResNetForImageClassification(ResNetConfig(num_labels=1000))
    model = RBLNResNetForImageClassification.from_model(hf, rbln_image_size=224, rbln_batch_size=8,
                                                        rbln_create_runtimes=False)
    program = model.graphs["model"].program
    kernels = [s.name for s in program.steps if s.kind == "kernel"]
    convs = [m for m in hf.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(name.startswith("conv2d") for name in kernels) == len(convs) == 53
    assert kernels.count("conv2d+add+relu") == 16  # one per bottleneck block
    assert not any("batch_norm" in name for name in kernels)
    stored = sum(c.weight.numel() + c.out_channels for c in convs) + sum(p.numel() for p in hf.classifier.parameters())
    assert sum(w.nbytes for w in program.weights) == 2 * stored  # bf16
