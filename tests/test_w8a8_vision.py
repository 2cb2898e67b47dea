"""W8A8 image classifiers (issue 20 part 2: "a ResNet-50 in int8").

The reference is transformers' fp32 ResNet with each batch norm folded into its convolution and
each convolution computing W8A8 as stated here: weight per output channel to int8 (scale rounded
to bf16, as the device stores it), each image to int8 by its own largest magnitude, products
summed in fp32, both scales after.
"""

import copy

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification

from optimum_npu import RBLNResNetForImageClassification
from test_vision import make

# fp32 on both sides, other summation orders; quantising activations is discontinuous, so an
# activation within fp32 noise of a rounding boundary may round apart (test_w8a8's reasoning):
# the mean error at fp32 noise, the largest within 2% of the largest |logit|.
MEAN_ERROR_RTOL = 1e-4
MAX_ERROR_RTOL = 0.02


def w8a8_resnet_reference(model):
    model = copy.deepcopy(model)
    for module in model.modules():
        conv, norm = getattr(module, "convolution", None), getattr(module, "normalization", None)
        if not isinstance(conv, torch.nn.Conv2d):
            continue
        weight, bias = conv.weight.detach(), conv.bias
        if isinstance(norm, torch.nn.BatchNorm2d):
            factor = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            weight = weight * factor.reshape(-1, 1, 1, 1)
            bias = norm.bias - norm.running_mean * factor
            module.normalization = torch.nn.Identity()
        w_scale = (weight.flatten(1).abs().amax(1) / 127).to(torch.bfloat16).float()
        w_q = (weight / w_scale.reshape(-1, 1, 1, 1)).round().clamp(-128, 127)

        def forward(x, conv=conv, w_q=w_q, w_scale=w_scale, bias=bias):
            x_scale = x.flatten(1).abs().amax(1) / 127
            x_q = (x / x_scale.reshape(-1, 1, 1, 1)).round().clamp(-127, 127)
            out = torch.nn.functional.conv2d(x_q, w_q, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            out = out * x_scale.reshape(-1, 1, 1, 1) * w_scale.reshape(1, -1, 1, 1)
            return out if bias is None else out + bias.reshape(1, -1, 1, 1)

        conv.forward = forward
    return model


def test_a_w8a8_resnet_in_exact_numerics_equals_the_w8a8_fp32_model():
    hf = make("resnet")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = RBLNResNetForImageClassification.from_model(
        hf, rbln_image_size=32, rbln_batch_size=2, rbln_numerics="exact",
        rbln_quantization={"weights": "int8", "activations": "int8"})
    try:
        program = model.graphs["model"].program
        assert {s.matmul_format for s in program.steps if s.flops} == {"int8", "16bit"}   # convs; the 16-bit head
        with torch.no_grad():
            expected = w8a8_resnet_reference(hf)(pixel_values=pixels).logits
            plain = hf(pixel_values=pixels).logits
        logits = model(pixels).logits
        scale = expected.abs().max()
        assert (logits - expected).abs().mean() <= MEAN_ERROR_RTOL * scale
        assert (logits - expected).abs().max() <= MAX_ERROR_RTOL * scale
        assert (plain - expected).abs().max() > 1e-3 * scale   # the quantisation is visible
        assert isinstance(hf.resnet.embedder.embedder.normalization, torch.nn.BatchNorm2d)   # the caller's model kept
    finally:
        model.close()


def test_image_classifiers_take_w8a8_only():
    with pytest.raises(ValueError, match="quantization of an image classifier is W8A8"):
        RBLNResNetForImageClassification.from_model(make("resnet"), rbln_image_size=32,
                                                    rbln_quantization={"weights": "int4"})


@pytest.mark.heavy   # a ResNet-50 compiled twice on the meta device
def test_resnet50_in_int8_holds_int8_weights_and_runs_at_the_int8_rate():
    with torch.device("meta"):
        hf = ResNetForImageClassification(ResNetConfig(num_labels=1000))
    programs = {}
    for label, quantization in (("bf16", None), ("w8a8", {"weights": "int8", "activations": "int8"})):
        model = RBLNResNetForImageClassification.from_model(hf, rbln_image_size=224, rbln_batch_size=8,
                                                            rbln_create_runtimes=False, rbln_quantization=quantization)
        programs[label] = model.graphs["model"]
    convs = [m for m in hf.modules() if isinstance(m, torch.nn.Conv2d)]
    head = sum(p.numel() for p in hf.classifier.parameters())
    # int8 weights, a bf16 scale and bias per output channel; the head in bf16
    expected = sum(c.weight.numel() + 4 * c.out_channels for c in convs) + 2 * head
    assert sum(w.nbytes for w in programs["w8a8"].program.weights) == expected
    # the convolutions at 4x the matrix rate; quantising each input and the head's 16 bits keep it above 1/4
    ratio = programs["w8a8"].estimate().total_s / programs["bf16"].estimate().total_s
    assert 0.25 < ratio < 0.75, ratio
