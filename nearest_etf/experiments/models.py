"""Backbones producing features h[N, d] for the classifier heads, and backbone + head.

- `MLP`: flatten, then (Linear -> BatchNorm1d -> ReLU) per hidden width; d = the last width.
- `SmallCNN`: three (convolution -> BatchNorm -> ReLU) blocks with 16, 32, 64 channels (the
  second with stride 2), global average pool; d = 64. 1-D ("cnn1d": signals [C, L], a vector
  input [L] as one channel) or 2-D ("cnn2d": images [C, H, W], a vector input of square length
  s^2 as a one-channel s x s image, e.g. the 8x8 digits).
- `ResNet18`: the CIFAR variant of He et al. (3x3 stem, no max-pool, stages of two basic blocks
  with 64/128/256/512 channels, strides 1/2/2/2, global average pool); d = 512.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP", "MODELS", "Classifier", "ResNet18", "SmallCNN", "make_backbone"]

MODELS = ("mlp", "cnn1d", "cnn2d", "resnet18")


class MLP(nn.Module):
    """h = ReLU(BN(L_m ... ReLU(BN(L_1 flatten(x))))) with hidden widths (w_1, ..., w_m);
    num_features = w_m."""

    def __init__(self, in_features: int, widths: Sequence[int] = (256, 256)) -> None:
        super().__init__()
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths}")
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in zip((in_features, *widths[:-1]), widths, strict=True):
            layers += [nn.Linear(width_in, width_out), nn.BatchNorm1d(width_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.num_features = int(widths[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """x[N, *input_shape] -> h[N, 64]: three (conv k -> BN -> ReLU) blocks with 16, 32, 64
    channels (padding k//2, the second with stride 2) and a global average pool; kernel k = 5
    in 1-D, 3 in 2-D. `input_shape` is (C, L) / (C, H, W), or (L,) / (s*s,) for one channel."""

    CHANNELS = (16, 32, 64)

    def __init__(self, input_shape: Sequence[int], dims: int) -> None:
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"dims must be 1 or 2, got {dims}")
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 1:
            side = math.isqrt(shape[0])
            if dims == 2 and side * side != shape[0]:
                raise ValueError(
                    f"cnn2d needs images [C, H, W] or vectors of square length, got inputs of "
                    f"shape {shape}"
                )
            shape = (1, shape[0]) if dims == 1 else (1, side, side)
        if len(shape) != dims + 1:
            raise ValueError(f"cnn{dims}d needs inputs of {dims + 1} dimensions, got {shape}")
        self.input_shape = shape
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        norm = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        kernel = 5 if dims == 1 else 3
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(
            zip((shape[0], *self.CHANNELS[:-1]), self.CHANNELS, strict=True)
        ):
            stride = 2 if i == 1 else 1
            layers += [conv(c_in, c_out, kernel, stride, kernel // 2), norm(c_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers, pool, nn.Flatten())
        self.num_features = self.CHANNELS[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.reshape(len(x), *self.input_shape))


class _BasicBlock(nn.Module):
    """y = ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x)), 3x3 convolutions."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False),
                nn.BatchNorm2d(channels_out),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 feature extractor: x[N, C, H, W] -> h[N, 512]."""

    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        blocks: list[nn.Module] = []
        channels = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [_BasicBlock(channels, width, stride), _BasicBlock(width, width, 1)]
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = 512

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"ResNet18 needs images [N, C, H, W], got shape {tuple(x.shape)}")
        return self.pool(self.blocks(self.stem(x)))


def make_backbone(
    name: str, input_shape: Sequence[int], widths: Sequence[int] = (256, 256)
) -> nn.Module:
    """ "mlp" (any input, flattened; hidden `widths`), "cnn1d" / "cnn2d" (`SmallCNN`) or
    "resnet18" (images [C, H, W])."""
    if name == "mlp":
        return MLP(math.prod(input_shape), widths)
    if name in ("cnn1d", "cnn2d"):
        return SmallCNN(input_shape, int(name[3]))
    if name == "resnet18":
        if len(input_shape) != 3:
            raise ValueError(
                f"resnet18 needs image data [C, H, W]; this data set has inputs of shape "
                f"{tuple(input_shape)} (use --model mlp)"
            )
        return ResNet18(input_shape[0])
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(map(repr, MODELS))}")


class Classifier(nn.Module):
    """logits = head(backbone(x), targets): a backbone and one of the heads of
    nearest_etf.nn.heads (whose forward takes the targets)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor, targets: Tensor | None = None) -> Tensor:
        return self.head(self.backbone(x), targets)
