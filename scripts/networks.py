"""The networks of DSAN (Han et al., Sec. III-D), each usable on its own.

Paper symbol -> class:
    E          DeepLabResNet50Encoder  (DeepLab-v2 ResNet-50, output stride 8; 4 as an option)
    C_1, C_2   ASPPClassifier          (C_1 on layer3 features, C_2 on layer4 features)
    E + C_i    Segmenter               (the segmentation sub-network; what inference needs)
    U_s, U_t   TranslationDecoder      (private decoders rendering source / target style)
    D_s, D_t   PatchDiscriminator      (image discriminators)
    D_p1, D_p2 PatchDiscriminator      (prediction-map discriminators, on softmax maps)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

EXPANSION = 4  # a ResNet bottleneck widens its output by 4


def scaled(channels: int, width: float) -> int:
    """Channel count of a width-multiplied layer (never below 4, so tiny widths stay valid)."""
    return max(4, int(round(channels * width)))


class Bottleneck(nn.Module):
    """ResNet bottleneck with torchvision's parameter names, so torchvision weights load by name."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


OUTPUT_STRIDES = {8: ((1, 1), (2, 1), (1, 2), (1, 4)), 4: ((1, 1), (1, 2), (1, 4), (1, 8))}
"""(stride, dilation) of layer1..layer4 for each output stride of E. 8 is DeepLab-v2's (the paper's); 4 keeps
layer2 at the stem's resolution and dilates every later layer twice as much (the same receptive fields, twice the
feature map's side, about three times E's work): finer maps for structures one or two feature cells thick."""


class DeepLabResNet50Encoder(nn.Module):
    """E: DeepLab-v2 ResNet-50 (bottlenecks 3-4-6-3), layer3 dilated 2, layer4 dilated 4: output stride 8
    (``output_stride`` 4: ``OUTPUT_STRIDES``).

    ``forward`` returns ``(layer3 features, layer4 features)``, both at 1/``output_stride`` of the input size
    (rounded up), feeding C_1 and C_2 respectively; U_s and U_t read the layer4 features.
    ``width`` multiplies every channel count: 1.0 is the paper's network, smaller values make CPU profiles.
    """

    def __init__(self, in_channels: int = 1, width: float = 1.0, blocks: Sequence[int] = (3, 4, 6, 3),
                 output_stride: int = 8) -> None:
        super().__init__()
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {sorted(OUTPUT_STRIDES)}, got {output_stride}")
        planes = [scaled(p, width) for p in (64, 128, 256, 512)]
        layers, in_ch = [], stem
        for n_blocks, p, (stride, dilation) in zip(blocks, planes, OUTPUT_STRIDES[output_stride]):
            layer = [Bottleneck(in_ch, p, stride, dilation)]
            layer += [Bottleneck(p * EXPANSION, p, 1, dilation) for _ in range(n_blocks - 1)]
            layers.append(nn.Sequential(*layer))
            in_ch = p * EXPANSION
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.layer3_channels = planes[2] * EXPANSION
        self.layer4_channels = planes[3] * EXPANSION

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f3 = self.layer3(self.layer2(self.layer1(x)))
        return f3, self.layer4(f3)


def load_torchvision_resnet50(encoder: DeepLabResNet50Encoder, path: str | os.PathLike) -> DeepLabResNet50Encoder:
    """Initialise E's layer1-layer4 from a local torchvision-format ResNet-50 state-dict file.

    As the paper (Sec. V-1) does, only layer1..layer4 are reused: the stem takes one channel and the
    fully connected head is gone. Never downloads; the file must exist. Loaded with weights_only=True.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    reused = {k: v for k, v in state.items() if k.split(".")[0] in ("layer1", "layer2", "layer3", "layer4")}
    if not reused:
        raise ValueError(f"{path}: no layer1..layer4 keys; is this a torchvision ResNet-50 state dict?")
    own = encoder.state_dict()
    mismatched = [k for k, v in reused.items() if k not in own or own[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f"{path} does not fit this encoder (is encoder_width 1.0?): {len(mismatched)} keys differ, "
            f"e.g. {mismatched[:5]}"
        )
    encoder.load_state_dict(reused, strict=False)
    logger.info("initialised encoder layer1-layer4 from %s (%d tensors)", path, len(reused))
    return encoder


class DilatedConv2d(nn.Conv2d):
    """A 3x3 convolution whose padding equals its dilation r, computed without the kernel rows (columns) that read
    only zero padding: an outer tap lies r pixels off-centre, outside an input whose height (width) is at most r.
    The same sums without their zero terms, so the same values and gradients; at CPU crops (64x64 images, 8x8
    features) three of C_i's four rates become 1x1 convolutions, 9x fewer FLOPs. Parameters as nn.Conv2d's."""

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rate = self.dilation[0]
        weight = self.weight
        pad_h, pad_w = rate, rate
        if x.shape[-2] <= rate:
            weight, pad_h = weight[:, :, 1:2, :], 0
        if x.shape[-1] <= rate:
            weight, pad_w = weight[:, :, :, 1:2], 0
        return F.conv2d(x, weight, self.bias, padding=(pad_h, pad_w), dilation=self.dilation)


class ASPPClassifier(nn.Module):
    """C_i: four dilated 3x3 convolutions (rates 6, 12, 18, 24) whose outputs are summed (DeepLab-v2).

    All four branches contribute (the widely copied AdaptSegNet version returns after two).
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(DilatedConv2d(in_channels, num_classes, r) for r in rates)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(())  # broadcasts; a loop over the whole ModuleList keeps it TorchScript-able
        for branch in self.branches:
            out = out + branch(x)
        return out


class Segmenter(nn.Module):
    """The segmentation sub-network E + C_1 + C_2.

    ``forward`` gives C_2's logits upsampled to the input size (inference, export); ``classify`` gives
    both levels' logits at feature resolution (training, Eq. (7)-(10)).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 5, width: float = 1.0, output_stride: int = 8) -> None:
        super().__init__()
        self.encoder = DeepLabResNet50Encoder(in_channels, width, output_stride=output_stride)
        self.aux_classifier = ASPPClassifier(self.encoder.layer3_channels, num_classes)
        self.main_classifier = ASPPClassifier(self.encoder.layer4_channels, num_classes)

    def classify(self, features: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.aux_classifier(features[0]), self.main_classifier(features[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classify(self.encoder(x))[1]
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


def with_pretrained_encoder(segmenter: Segmenter, encoder_weights: str | os.PathLike | None) -> Segmenter:
    """``segmenter`` with E's layer1-layer4 loaded from a local torchvision ResNet-50 file, if one is given
    (the paper's 80.73 % variant, Sec. V-1); unchanged when ``encoder_weights`` is None."""
    if encoder_weights is not None:
        load_torchvision_resnet50(segmenter.encoder, encoder_weights)
    return segmenter


def make_norm(kind: str, channels: int) -> nn.Module:
    """Normalisation layer of the translation decoders: 'instance', 'batch' or 'none'."""
    layers = {
        "instance": lambda: nn.InstanceNorm2d(channels, affine=True),
        "batch": lambda: nn.BatchNorm2d(channels),
        "none": nn.Identity,
    }
    if kind not in layers:
        raise ValueError(f"norm must be one of {sorted(layers)}, got {kind!r}")
    return layers[kind]()


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            make_norm(norm, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            make_norm(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


TRANSLATION_STRIDE = max(OUTPUT_STRIDES)
"""The largest output stride of E, which U's stride-2 transposed convolutions undo: U(E(x)) has x's size when its
sides are multiples of this, whichever output stride E has."""


def transposed_upsampling(in_channels: int, out_channels: int) -> nn.Module:
    """2x: a 3x3 transposed convolution at stride 2 (the paper's decoders)."""
    return nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1)


def resize_upsampling(in_channels: int, out_channels: int) -> nn.Module:
    """2x: nearest-neighbour resize, then a 3x3 convolution (resize-convolution)."""
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(in_channels, out_channels, 3, padding=1)
    )


UPSAMPLINGS = {"transposed": transposed_upsampling, "resize": resize_upsampling}


class TranslationDecoder(nn.Module):
    """U_s / U_t: conv, 3 residual blocks, log2(``stride``) 2x upsamplings (3 at E's output stride 8), tanh.

    Reads E's layer4 features (at 1/``stride``) and renders a 1-channel image in [-1, 1] of exactly the
    encoder input's size whenever that input's sides are multiples of ``stride``. ``upsampling``:
    ``transposed`` (the paper's stride-2 transposed convolutions) or ``resize`` (nearest-neighbour 2x, then a
    3x3 convolution): a 3x3 kernel at stride 2 overlaps every other output pixel twice, the checkerboard that a
    generator can also use to fool its discriminator; resizing first cannot draw it (Odena et al., Distill 2016).
    """

    def __init__(
        self, in_channels: int, out_channels: int = 1, channels: int = 256, num_res_blocks: int = 3,
        norm: str = "instance", stride: int = 8, upsampling: str = "transposed",
    ) -> None:
        super().__init__()
        if stride not in OUTPUT_STRIDES:
            raise ValueError(f"stride must be one of {sorted(OUTPUT_STRIDES)}, got {stride}")
        if upsampling not in UPSAMPLINGS:
            raise ValueError(f"upsampling must be one of {sorted(UPSAMPLINGS)}, got {upsampling!r}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 3, padding=1), make_norm(norm, channels), nn.ReLU(inplace=True)
        ]
        layers += [ResidualBlock(channels, norm) for _ in range(num_res_blocks)]
        ch = channels
        for _ in range(stride.bit_length() - 2):  # all but the last of the log2(stride) upsamplings
            layers += [UPSAMPLINGS[upsampling](ch, ch // 2), make_norm(norm, ch // 2), nn.ReLU(inplace=True)]
            ch //= 2
        layers += [UPSAMPLINGS[upsampling](ch, out_channels), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class PatchDiscriminator(nn.Module):
    """D_s, D_t, D_p1, D_p2: four k4 s2 convolutions (64-128-256-512) with LeakyReLU 0.2, then a
    1-channel k4 s1 convolution giving a map of patch logits (no sigmoid: the GAN loss decides).

    Inputs need sides of at least 32 pixels.
    """

    def __init__(self, in_channels: int, channels: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for out in channels:
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def batch_norms(module: nn.Module) -> list[nn.Module]:
    """The batch-norm layers of ``module``: the layers that normalise with statistics over the batch."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batch_statistics(module: nn.Module) -> bool:
    """Whether one call of ``module`` on two concatenated batches computes something else than two calls."""
    return bool(batch_norms(module))


def unique_parameters(*modules: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of several modules, each once, so shared modules (Table V variants) can be
    handed to one optimiser without duplicates."""
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def set_requires_grad(modules: Iterable[nn.Module], flag: bool) -> None:
    """Freeze (False) or unfreeze (True) every parameter of the given modules."""
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(flag)


@contextmanager
def batch_norm_momentum(module: nn.Module, momentum: float | None) -> Iterator[list[nn.Module]]:
    """Within the block, every batch-norm layer of ``module`` (yielded) updates its running statistics with
    ``momentum`` (0: not at all; None: cumulative average); each layer's own momentum is restored afterwards."""
    norms = batch_norms(module)
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = momentum
    try:
        yield norms
    finally:
        for m, own in zip(norms, saved):
            m.momentum = own


@contextmanager
def running_stats_kept(module: nn.Module, keep: bool = True) -> Iterator[None]:
    """Within the block (if ``keep``), the module's batch-norm layers still normalise with batch statistics in
    training mode but leave their running statistics, the ones evaluation uses, unchanged (their batch counters
    too, so a kept pass leaves no trace in a checkpoint)."""
    if not keep:
        yield
        return
    with batch_norm_momentum(module, 0.0) as norms:
        counters = [m.num_batches_tracked for m in norms if m.num_batches_tracked is not None]
        saved = [counter.clone() for counter in counters]
        try:
            yield
        finally:
            for counter, count in zip(counters, saved):
                counter.copy_(count)


def translate_as_in_training(encoder: nn.Module, decoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """U(E(x)) as DSAN's training passes make x_s->t and x_t->s: both networks in training mode, so batch norm
    normalises with the batch's own statistics (the running statistics may follow another domain:
    ``running_stats``), without gradients, and writing no running statistic back. Previews, translation_check and
    validation's symmetry criterion translate this way. Whole slices need not have the training crops' sides,
    multiples of U's upsampling: they are edge-padded to the next multiple and the translation cropped back."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (0, -width % TRANSLATION_STRIDE, 0, -height % TRANSLATION_STRIDE), mode="replicate")
    modes = [encoder.training, decoder.training]
    encoder.train()
    decoder.train()
    try:
        with torch.no_grad(), running_stats_kept(encoder), running_stats_kept(decoder):
            return decoder(encoder(padded)[1])[..., :height, :width]
    finally:
        encoder.train(modes[0])
        decoder.train(modes[1])


@contextmanager
def frozen(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, the modules' parameters take no gradient (e.g. the discriminators during the
    generator step); they are unfrozen afterwards even if the block raises."""
    modules = list(modules)
    set_requires_grad(modules, False)
    try:
        yield
    finally:
        set_requires_grad(modules, True)
