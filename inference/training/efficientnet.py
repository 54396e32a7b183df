"""EfficientNet-B0 for single-channel chest radiographs, in plain PyTorch.

Why plain PyTorch: torchvision does not import with the CPU torch build we pin, and we train from
scratch anyway (no pretrained weights can be fetched), so nothing is gained from a model zoo.

Architecture: Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks"
(ICML 2019), B0 row — stem 3x3/2 conv with 32 channels, seven stages of MBConv blocks with
squeeze-and-excitation (SE ratio 0.25 of the block input) and SiLU, a 1x1 head conv with 1280
channels, global average pooling, dropout 0.2 and a linear classifier.  Stochastic depth (drop
path) rises linearly from 0 to ``drop_path_rate`` across the blocks.

Differences from the paper, each on purpose:

* The stem takes **one** channel: the radiograph is monochrome and the ONNX contract feeds
  ``[batch, 1, 224, 224]``.
* Input normalisation (mean/std) lives **inside** the module as buffers, so the exported graph
  accepts raw ``[0, 1]`` pixels and the runtime never has to know the statistics.
* The classifier is a **single logit** for PNEUMONIA (binary cross-entropy), and the module exposes
  :meth:`EfficientNetB0.forward_features` / :meth:`EfficientNetB0.cam` so that the class activation
  map (Zhou et al., CVPR 2016) can be computed from the last feature map and the linear weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: (expand_ratio, out_channels, repeats, kernel, stride) per stage — EfficientNet-B0 table.
B0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 16, 1, 3, 1),
    (6, 24, 2, 3, 2),
    (6, 40, 2, 5, 2),
    (6, 80, 3, 3, 2),
    (6, 112, 3, 5, 1),
    (6, 192, 4, 5, 2),
    (6, 320, 1, 3, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
#: BatchNorm epsilon of the reference implementation.  The momentum is PyTorch's default 0.1, not
#: the reference's 0.01 (TF 0.99): with ~140 steps per epoch and a fast-moving network the slow
#: running averages lag the weights so far that the eval-mode model is useless for the first epochs.
#: The trainer also re-estimates the statistics at the evaluation resolution before validating.
BN_EPS = 1e-3
BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class EfficientNetConfig:
    """Hyper-parameters of the network that are not fixed by the B0 table.

    ``in_mean``/``in_std`` are the pixel statistics (of ``[0, 1]`` images) used by the in-graph
    normalisation; the trainer measures them on the training split and stores them in the
    checkpoint buffers, so these defaults only matter for an untrained model.
    """

    in_channels: int = 1
    num_outputs: int = 1
    dropout: float = 0.2
    drop_path_rate: float = 0.2
    in_mean: float = 0.5
    in_std: float = 0.25


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class ConvBNAct(nn.Sequential):
    """Conv -> BatchNorm -> optional SiLU, with 'same' padding for odd kernels."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            _bn(out_ch),
        ]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al. 2018): global pool -> reduce -> SiLU -> expand -> sigmoid."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        s = self.expand(F.silu(self.reduce(s)))
        return x * torch.sigmoid(s)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): drop the residual branch per *sample*.

    Identity at inference (and therefore absent from the exported graph).
    """
    if not training or p <= 0.0:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)
    return x * mask / keep


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, SE, 1x1 project (+ residual)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        expand_ratio: int,
        kernel: int,
        stride: int,
        drop_path_p: float,
    ) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        self.drop_path_p = drop_path_p
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_ch, hidden, 1))
        layers.append(ConvBNAct(hidden, hidden, kernel, stride, groups=hidden))
        layers.append(SqueezeExcitation(hidden, max(1, in_ch // 4)))
        layers.append(ConvBNAct(hidden, out_ch, 1, act=False))
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.use_residual:
            out = x + drop_path(out, self.drop_path_p, self.training)
        return out


class EfficientNetB0(nn.Module):
    """EfficientNet-B0 with one input channel, in-graph normalisation and a single PNEUMONIA logit.

    ``forward`` returns the logit ``[B]``.  ``forward_features`` returns the last feature map
    ``[B, 1280, H/32, W/32]`` (7x7 at 224), and ``cam`` turns it into the PNEUMONIA class
    activation map ``cam[i, j] = w . f[:, :, i, j] + b / (H*W)`` (the contract's form: the feature
    map weighted by the linear weights, plus the bias spread over the cells).  Because global
    average pooling is linear, ``logit = mean(cam) + b * (1 - 1/(H*W))`` exactly.
    """

    # Buffers (register_buffer), declared so they type as tensors rather than ``Tensor | Module``.
    in_mean: Tensor
    in_std: Tensor

    def __init__(self, config: EfficientNetConfig | None = None) -> None:
        super().__init__()
        cfg = config or EfficientNetConfig()
        self.config = cfg
        self.register_buffer("in_mean", torch.tensor(cfg.in_mean, dtype=torch.float32))
        self.register_buffer("in_std", torch.tensor(cfg.in_std, dtype=torch.float32))
        self.stem = ConvBNAct(cfg.in_channels, STEM_CHANNELS, 3, stride=2)

        total_blocks = sum(stage[2] for stage in B0_STAGES)
        blocks: list[nn.Module] = []
        in_ch = STEM_CHANNELS
        index = 0
        for expand, out_ch, repeats, kernel, stride in B0_STAGES:
            for r in range(repeats):
                p = cfg.drop_path_rate * index / total_blocks
                blocks.append(MBConv(in_ch, out_ch, expand, kernel, stride if r == 0 else 1, p))
                in_ch = out_ch
                index += 1
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(in_ch, HEAD_CHANNELS, 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, cfg.num_outputs)
        self._init_weights()

    def _init_weights(self) -> None:
        """He (fan-out) init for convs, small uniform for the classifier — as the reference."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def set_input_stats(self, mean: float, std: float) -> None:
        """Store the training pixel statistics used by the in-graph normalisation."""
        self.in_mean.fill_(float(mean))
        self.in_std.fill_(float(std))

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, 1, H, W]`` pixels in ``[0, 1]`` -> last feature map ``[B, 1280, H/32, W/32]``."""
        x = (x - self.in_mean) / self.in_std
        return self.head(self.blocks(self.stem(x)))

    def logits_from_features(self, features: Tensor) -> Tensor:
        """Global average pool + dropout + linear -> ``[B]`` PNEUMONIA logit."""
        pooled = features.mean(dim=(2, 3))
        return self.classifier(self.dropout(pooled))[:, 0]

    def cam(self, features: Tensor) -> Tensor:
        """PNEUMONIA class activation map ``[B, H', W']``: per-cell logit contribution.

        Not normalised.  ``cam.mean((1, 2)) + b * (1 - 1/(H*W))`` equals the (eval-mode) logit.
        """
        weight = self.classifier.weight[0]  # [1280]
        bias = self.classifier.bias[0]
        hw = features.shape[2] * features.shape[3]
        return torch.einsum("bchw,c->bhw", features, weight) + bias / hw

    def forward(self, x: Tensor) -> Tensor:
        return self.logits_from_features(self.forward_features(x))


class ExportWrapper(nn.Module):
    """The graph we export: ``image`` -> (``probability`` [B], ``cam`` [B, 7, 7]).

    The sigmoid is inside the graph so the runtime gets a probability, per the ONNX contract.
    """

    def __init__(self, model: EfficientNetB0) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.forward_features(image)
        logit = self.model.logits_from_features(features)
        return torch.sigmoid(logit), self.model.cam(features)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (for the model card)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
