"""ResUNet: a U-net whose levels are stacks of ResNet blocks, for 2D+T perfusion segmentation.

Follows Xue et al., Radiology: AI 2020, App. E3 (REFERENCES.md §5): every block holds two 3x3
convolutions (stride 1, padding 1), each followed by BatchNorm, with LeakyReLU and an identity
shortcut; downsampling between levels, upsampling with skip connections (concatenation) back
up; the time frames of the 2D+T series are the input channels. The paper's best configuration
(two levels, 2 and 3 blocks, 64/128 filters) is ``ResUNetConfig.paper()``.

For a 2-core CPU the network can first halve the resolution (``stem_stride=2``) and return
logits upsampled bilinearly to the input grid; this cuts the cost about fourfold.

Shapes: input float32 [batch, frames, rows, cols] (rows and cols divisible by
``stem_stride * 2 ** (levels - 1)``), output logits float32 [batch, classes, rows, cols].
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn import functional


class ResUNetConfig(BaseModel):
    """Architecture of a :class:`ResUNet` (stored next to the weights)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_channels: int = Field(48, ge=1, description="input frames (time as channels)")
    n_classes: int = Field(4, ge=2, description="0 bg, 1 LV blood, 2 myocardium, 3 RV")
    filters: tuple[int, ...] = Field((24, 48, 96), description="filters per level, fine to coarse")
    blocks: tuple[int, ...] = Field((1, 2, 2), description="ResNet blocks per level")
    stem_stride: int = Field(2, ge=1, le=4, description="stride of the first convolution")
    negative_slope: float = Field(0.01, ge=0.0, description="LeakyReLU slope")

    @model_validator(mode="after")
    def _same_length(self) -> "ResUNetConfig":
        if len(self.filters) != len(self.blocks) or not self.filters:
            raise ValueError(f"filters and blocks need one entry per level, got filters="
                             f"{self.filters} and blocks={self.blocks}")
        if min(self.filters) < 1 or min(self.blocks) < 1:
            raise ValueError(f"filters and blocks must be >= 1, got {self.filters}, {self.blocks}")
        return self

    @property
    def size_multiple(self) -> int:
        """Input rows and cols must be divisible by this."""
        return self.stem_stride * 2 ** (len(self.filters) - 1)

    @classmethod
    def paper(cls) -> "ResUNetConfig":
        """Best configuration of the paper's search: 2 levels, 2 + 3 blocks, 64/128 filters."""
        return cls(filters=(64, 128), blocks=(2, 3), stem_stride=1)


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResBlock(nn.Module):
    """Two 3x3 conv + BatchNorm with LeakyReLU and an identity shortcut; [B, C, H, W] -> same."""

    def __init__(self, channels: int, negative_slope: float) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, channels)
        self.conv2 = _conv_bn(channels, channels)
        self.activation = nn.LeakyReLU(negative_slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.activation(self.conv1(x))
        return self.activation(self.conv2(y) + x)


class ResUNet(nn.Module):
    """U-net of ResNet blocks. ``forward``: [B, frames, H, W] -> logits [B, classes, H, W]."""

    def __init__(self, config: ResUNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or ResUNetConfig()
        c = self.config
        slope = c.negative_slope
        self.stem = nn.Sequential(_conv_bn(c.in_channels, c.filters[0], c.stem_stride),
                                  nn.LeakyReLU(slope))
        self.down = nn.ModuleList()
        self.encoder = nn.ModuleList()
        for level, (width, count) in enumerate(zip(c.filters, c.blocks)):
            if level > 0:
                self.down.append(nn.Sequential(_conv_bn(c.filters[level - 1], width, 2),
                                               nn.LeakyReLU(slope)))
            self.encoder.append(nn.Sequential(*[ResBlock(width, slope) for _ in range(count)]))
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(c.filters) - 2, -1, -1):
            width = c.filters[level]
            self.up.append(nn.ConvTranspose2d(c.filters[level + 1], width, 2, stride=2))
            self.merge.append(nn.Sequential(
                nn.Conv2d(2 * width, width, 1, bias=False), nn.BatchNorm2d(width),
                nn.LeakyReLU(slope)))
            self.decoder.append(nn.Sequential(
                *[ResBlock(width, slope) for _ in range(c.blocks[level])]))
        self.head = nn.Conv2d(c.filters[0], c.n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        x = self.stem(x)
        skips = []
        for level, blocks in enumerate(self.encoder):
            if level > 0:
                x = self.down[level - 1](x)
            x = blocks(x)
            skips.append(x)
        for up, merge, blocks, skip in zip(self.up, self.merge, self.decoder,
                                           reversed(skips[:-1])):
            x = blocks(merge(torch.cat([up(x), skip], dim=1)))
        logits = self.head(x)
        if self.config.stem_stride > 1:
            logits = functional.interpolate(logits, size=size, mode="bilinear",
                                            align_corners=False)
        return logits


def count_convolutions(model: nn.Module) -> int:
    """Number of convolution layers (2D and transposed) in ``model``."""
    return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules())


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, *,
                      iou_weight: float = 1.0, eps: float = 1.0) -> torch.Tensor:
    """Cross-entropy + ``iou_weight`` x (1 - soft IoU), the paper's loss (App. E3).

    Args:
        logits: float [B, classes, H, W].
        target: int64 [B, H, W] class indices.
        iou_weight: weight of the soft-IoU term.
        eps: smoothing added to intersection and union (pixels), keeps absent classes finite.

    The soft IoU is computed per image and per foreground class (classes 1..), then averaged.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected logits [B, C, H, W] and target [B, H, W], got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    cross_entropy = functional.cross_entropy(logits, target)
    probability = torch.softmax(logits, dim=1)[:, 1:]
    one_hot = functional.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    intersection = (probability * one_hot).sum(dim=(2, 3))
    union = (probability + one_hot - probability * one_hot).sum(dim=(2, 3))
    soft_iou = (intersection + eps) / (union + eps)
    return cross_entropy + iou_weight * (1.0 - soft_iou.mean())
