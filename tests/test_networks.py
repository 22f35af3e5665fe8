"""Shapes and wiring of every DSAN network (Sec. III-D)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scripts.networks import (
    ASPPClassifier,
    DeepLabResNet50Encoder,
    PatchDiscriminator,
    Segmenter,
    TranslationDecoder,
    frozen,
    load_torchvision_resnet50,
    translate_as_in_training,
    unique_parameters,
)


@pytest.mark.parametrize("width", [0.125, 0.25])
@pytest.mark.parametrize("size", [(32, 32), (64, 48), (40, 72)])
def test_encoder_has_output_stride_8_and_scaled_channels(width: float, size: tuple[int, int]) -> None:
    encoder = DeepLabResNet50Encoder(in_channels=1, width=width).eval()
    f3, f4 = encoder(torch.randn(2, 1, *size))
    assert f3.shape == (2, encoder.layer3_channels, size[0] // 8, size[1] // 8)
    assert f4.shape == (2, encoder.layer4_channels, size[0] // 8, size[1] // 8)
    assert encoder.layer4_channels == 2 * encoder.layer3_channels == int(round(512 * width)) * 4


@pytest.mark.parametrize("size", [(32, 32), (64, 48)])
def test_output_stride_4_doubles_the_feature_maps_and_the_decoders_render_at_input_size(size) -> None:
    coarse = DeepLabResNet50Encoder(in_channels=1, width=0.125).eval()
    fine = DeepLabResNet50Encoder(in_channels=1, width=0.125, output_stride=4).eval()
    fine.load_state_dict(coarse.state_dict())  # the same weights: only strides and dilations differ
    x = torch.randn(2, 1, *size)
    f3, f4 = fine(x)
    assert f3.shape[-2:] == f4.shape[-2:] == (size[0] // 4, size[1] // 4)
    assert f4.shape[-2:] == tuple(2 * s for s in coarse(x)[1].shape[-2:])
    # the receptive fields stay: each later layer is dilated twice as much
    assert [layer[0].conv2.dilation[0] for layer in (fine.layer2, fine.layer3, fine.layer4)] == [2, 4, 8]
    decoder = TranslationDecoder(fine.layer4_channels, channels=16, stride=4)
    assert decoder(f4).shape == (2, 1, *size)
    segmenter = Segmenter(1, 5, width=0.125, output_stride=4).eval()
    assert segmenter(x).shape == (2, 5, *size)
    with pytest.raises(ValueError, match="output_stride must be one of"):
        DeepLabResNet50Encoder(width=0.125, output_stride=16)


def test_encoder_at_paper_width_is_resnet50() -> None:
    encoder = DeepLabResNet50Encoder(in_channels=1, width=1.0)
    assert [len(layer) for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)] == [3, 4, 6, 3]
    assert (encoder.layer3_channels, encoder.layer4_channels) == (1024, 2048)
    assert encoder.layer3[0].conv2.dilation == (2, 2) and encoder.layer4[0].conv2.dilation == (4, 4)
    # torchvision's ResNet-50 has 23.5 M parameters without its 2 M fc head and with 3 input channels
    n_params = sum(p.numel() for p in encoder.parameters())
    assert 23.4e6 < n_params < 23.6e6


def test_aspp_sums_all_four_branches() -> None:
    classifier = ASPPClassifier(in_channels=8, num_classes=3)
    x = torch.randn(1, 8, 16, 16)
    expected = sum(branch(x) for branch in classifier.branches)
    assert len(classifier.branches) == 4
    assert [b.dilation[0] for b in classifier.branches] == [6, 12, 18, 24]
    torch.testing.assert_close(classifier(x), expected)


@pytest.mark.parametrize("size", [(32, 32), (45, 61)])
def test_segmenter_outputs_logits_at_input_size(size: tuple[int, int]) -> None:
    segmenter = Segmenter(in_channels=1, num_classes=5, width=0.125).eval()
    x = torch.randn(2, 1, *size)
    assert segmenter(x).shape == (2, 5, *size)
    aux, main = segmenter.classify(segmenter.encoder(x))
    assert aux.shape == main.shape == (2, 5, -(-size[0] // 8), -(-size[1] // 8))


@pytest.mark.parametrize("size", [(32, 32), (64, 40), (256, 256)])
@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("upsampling", ["transposed", "resize"])
def test_translation_decoder_restores_input_size_in_tanh_range(size: tuple[int, int], norm: str,
                                                               upsampling: str) -> None:
    encoder = DeepLabResNet50Encoder(width=0.125)
    decoder = TranslationDecoder(encoder.layer4_channels, channels=16, norm=norm, upsampling=upsampling)
    with torch.no_grad():
        out = decoder(encoder(torch.randn(1, 1, *size))[1])
    assert out.shape == (1, 1, *size)
    assert out.abs().max() <= 1.0


def test_translation_decoder_rejects_unknown_norm() -> None:
    with pytest.raises(ValueError, match="norm must be one of"):
        TranslationDecoder(64, norm="group")
    with pytest.raises(ValueError, match="upsampling must be one of"):
        TranslationDecoder(64, upsampling="bilinear")


def _interior_spread(upsampling: str) -> float:
    """Std of the centre of what a decoder renders from spatially constant features: any pattern there comes from
    the upsampling itself, the borders' zero padding being too far away to reach it."""
    torch.manual_seed(0)
    decoder = TranslationDecoder(8, channels=16, norm="none", upsampling=upsampling)
    with torch.no_grad():
        out = decoder(torch.ones(1, 8, 24, 24))[0, 0]
    return out[80:112, 80:112].std().item()


def test_resize_upsampling_renders_no_checkerboard_where_transposed_convolutions_do() -> None:
    assert _interior_spread("resize") < 1e-5
    assert _interior_spread("transposed") > 1e-3


@pytest.mark.parametrize("size,in_channels", [((32, 32), 1), ((64, 64), 5), ((96, 64), 5)])
def test_patch_discriminator_gives_a_patch_map(size: tuple[int, int], in_channels: int) -> None:
    disc = PatchDiscriminator(in_channels, channels=(8, 16, 32, 64))
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert all(c.stride == (2, 2) and c.kernel_size == (4, 4) for c in convs[:4])
    out = disc(torch.randn(2, in_channels, *size))
    assert out.shape == (2, 1, size[0] // 16 - 1, size[1] // 16 - 1)


def test_torchvision_weights_initialise_layers_1_to_4_only(tmp_path) -> None:
    source = DeepLabResNet50Encoder(width=1.0)
    state = {k: v for k, v in source.state_dict().items()}
    state["conv1.weight"] = torch.randn(64, 3, 7, 7)  # torchvision's stem takes RGB
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    target = DeepLabResNet50Encoder(width=1.0)
    stem_before = target.conv1.weight.clone()
    load_torchvision_resnet50(target, path)
    torch.testing.assert_close(target.layer4[2].conv3.weight, source.layer4[2].conv3.weight)
    torch.testing.assert_close(target.layer1[0].bn1.running_mean, source.layer1[0].bn1.running_mean)
    torch.testing.assert_close(target.conv1.weight, stem_before)


def test_torchvision_weights_of_wrong_width_are_refused(tmp_path) -> None:
    path = tmp_path / "small.pth"
    torch.save(DeepLabResNet50Encoder(width=0.125).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit this encoder"):
        load_torchvision_resnet50(DeepLabResNet50Encoder(width=0.25), path)


def test_unique_parameters_lists_shared_modules_once() -> None:
    shared = nn.Linear(2, 2)
    other = nn.Linear(2, 3)
    params = list(unique_parameters(shared, shared, other))
    assert len(params) == 4


def test_frozen_blocks_gradients_and_restores_them() -> None:
    net = nn.Linear(2, 1)
    with frozen([net]):
        assert not any(p.requires_grad for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(RuntimeError), frozen([net]):
        raise RuntimeError("boom")
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("size", [(12, 20), (80, 80), (37, 50)])
def test_whole_slices_of_any_size_translate_to_their_own_size(size: tuple[int, int]) -> None:
    encoder = Segmenter(1, 3, width=0.125).encoder
    decoder = TranslationDecoder(encoder.layer4_channels, channels=16)
    images = torch.rand(2, 1, *size) * 2 - 1
    translated = translate_as_in_training(encoder, decoder, images)
    assert translated.shape == images.shape
    if size[0] % 8 == 0 and size[1] % 8 == 0:  # the crops training translates: no padding, the training pass
        encoder.train()
        decoder.train()
        with torch.no_grad():
            torch.testing.assert_close(translated, decoder(encoder(images)[1]))


@pytest.mark.parametrize("size", [(8, 8), (8, 20), (13, 7), (32, 32)])
def test_dilated_convolution_skips_only_taps_that_read_padding(size: tuple[int, int]) -> None:
    from scripts.networks import DilatedConv2d

    torch.manual_seed(0)
    x = torch.randn(2, 16, *size, dtype=torch.float64, requires_grad=True)
    for rate in (6, 12, 24):
        conv = DilatedConv2d(16, 5, rate).double()
        fast = conv(x)
        full = torch.nn.Conv2d.forward(conv, x)
        torch.testing.assert_close(fast, full)
        grads = [torch.autograd.grad(out.square().sum(), [x, conv.weight, conv.bias]) for out in (fast, full)]
        for got, expected in zip(*grads):
            torch.testing.assert_close(got, expected)
