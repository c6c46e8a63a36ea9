"""Small plain-PyTorch networks for 8x8 digits (no torchvision: it has no CPU build here).

Every net takes images ``[batch, 1, 8, 8]``; the sequence models read the image as 8 rows of 8 pixels.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class ConvNet(nn.Module):
    """``blocks`` conv-BN-ReLU blocks (a 2x2 max-pool after the 2nd and 4th), global pooling, a linear head."""

    def __init__(self, in_channels: int = 1, channels: int = 32, blocks: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(blocks):
            layers.append(conv_bn_relu(c_in, channels))
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
            c_in = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class MLPNet(nn.Module):
    """A Linear-heavy net: the model dynamic int8 quantization is made for."""

    def __init__(self, in_features: int = 64, hidden: int = 256, layers: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        dims = [in_features] + [hidden] * layers
        blocks: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            blocks += [nn.Linear(d_in, d_out), nn.ReLU()]
        blocks.append(nn.Linear(dims[-1], num_classes))
        self.layers = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LSTMNet(nn.Module):
    """An LSTM over the 8 rows of the image; the last hidden state feeds a linear head."""

    def __init__(self, input_size: int = 8, hidden_size: int = 64, num_layers: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.flatten(1, 2) if x.dim() == 4 else x)
        return self.head(out[:, -1])


class TransformerNet(nn.Module):
    """A ``nn.TransformerEncoder`` over the 8 rows of the image, mean-pooled into a linear head."""

    def __init__(
        self,
        input_size: int = 8,
        seq_len: int = 8,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(input_size, d_model)
        self.position = nn.Parameter(torch.zeros(1, seq_len, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(1, 2) if x.dim() == 4 else x) + self.position
        return self.head(self.encoder(tokens).mean(dim=1))


class BasicBlock(nn.Module):
    """torchvision's ResNet ``BasicBlock``, as torchvision writes it: one ``self.relu`` module called twice."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A ResNet with torchvision's structure (stem, stages of :class:`BasicBlock`, global pooling, ``fc``),
    sized for 8x8 images: ``blocks`` per stage, ``widths`` channels, stride 2 from the second stage on."""

    def __init__(
        self, in_channels: int = 1, widths: tuple[int, ...] = (16, 32), blocks: int = 2, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            stages.append(
                nn.Sequential(
                    *(BasicBlock(c_in if j == 0 else width, width, 2 if i and not j else 1) for j in range(blocks))
                )
            )
            c_in = width
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.flatten(self.avgpool(self.layers(x)), 1))
