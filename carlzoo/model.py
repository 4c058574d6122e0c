"""The CARL encoder: ResNet backbone, projection head and prototypes.

CARL (Silva & Ramirez Rivera, SAC 2022, arXiv 2112.15421) maps an image to a
projection z (the encoder f and head g), scores z against K learnable prototypes
(eq. 2) and turns the scores into an assignment with a softmax (eq. 3).

The paper scores with a raw dot product. Measured on CIFAR-10 that form collapses in
the first epoch (all images on one prototype), so the default here L2-normalises z and
the prototypes and divides by a temperature (``logits="cosine"``); the literal form is
``logits="dot"``.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = [
    "ModelConfig",
    "CARLOutput",
    "CARLModel",
    "ResNetBackbone",
    "ProjectionHead",
    "Prototypes",
    "build_model",
]

_BLOCKS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
_STEMS = ("cifar", "imagenet")
_LOGITS = ("cosine", "dot")
_SIZES = ("width", "proj_hidden_dim", "proj_dim", "num_prototypes")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a CARL encoder. Every field has the paper's default."""

    backbone: str = "resnet18"
    stem: str = "cifar"  # "cifar": 3x3 conv stride 1, no max-pool (inputs <= 64 px)
    width: int = 64  # channels of the first stage; 64 is torchvision's ResNet
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    num_prototypes: int = 100
    logits: str = "cosine"  # "cosine": normalised z and prototypes / temperature; "dot": eq. 2
    temperature: float = 0.1
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        if self.backbone not in _BLOCKS:
            raise ValueError(f"model.backbone={self.backbone!r}: expected one of {sorted(_BLOCKS)}")
        if self.stem not in _STEMS:
            raise ValueError(f"model.stem={self.stem!r}: expected one of {list(_STEMS)}")
        if self.logits not in _LOGITS:
            raise ValueError(f"model.logits={self.logits!r}: expected one of {list(_LOGITS)}")
        for name in _SIZES:  # 8.0 from a JSON file would only fail deep inside torch
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"model.{name} must be an integer, got {value!r}")
        if min(self.width, self.proj_hidden_dim, self.proj_dim) < 1 or self.num_prototypes < 2:
            raise ValueError(
                "model.width, model.proj_hidden_dim, model.proj_dim must be >= 1 and "
                "model.num_prototypes >= 2, got "
                f"{self.width}, {self.proj_hidden_dim}, {self.proj_dim}, {self.num_prototypes}"
            )
        if self.temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**values)


class CARLOutput(NamedTuple):
    features: Tensor  # (B, F) backbone features
    projection: Tensor  # (B, D) projection z
    logits: Tensor  # (B, K) prototype logits


class ResNetBackbone(ResNet):
    """torchvision's ResNet with a width option, a CIFAR stem and no classifier.

    Parameter names match torchvision's, so ImageNet-stem width-64 weights load as they are.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        stem: str = "cifar",
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        block, layers = _BLOCKS[arch]
        nn.Module.__init__(self)
        # The attributes ResNet._make_layer reads.
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        if stem == "cifar":
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.num_features = width * 8 * block.expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)  # (B, F)


class ProjectionHead(nn.Module):
    """The paper's projection g: two hidden layers (Linear, BN, ReLU) and a linear output."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Prototypes(nn.Module):
    """K learnable prototypes c_k; ``forward(z)`` gives the logits q_k = <z, c_k> (eq. 2).

    With ``logits="cosine"`` both z and c_k are L2-normalised and the score is divided by
    ``temperature``; the prototypes are normalised inside ``forward``, so the training loop
    never re-normalises them by hand.
    """

    def __init__(
        self, dim: int, num_prototypes: int, logits: str = "cosine", temperature: float = 0.1
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)
        self.logits = logits
        self.temperature = temperature

    def forward(self, z: Tensor) -> Tensor:
        if self.logits == "cosine":
            return (
                F.linear(F.normalize(z, dim=-1), F.normalize(self.weight, dim=-1))
                / self.temperature
            )
        return F.linear(z, self.weight)  # (B, K)

    def extra_repr(self) -> str:
        k, d = self.weight.shape
        return f"dim={d}, num_prototypes={k}, logits={self.logits}, temperature={self.temperature}"


class CARLModel(nn.Module):
    """Backbone -> projection head -> prototypes.

    ``forward_features`` gives the backbone features (what linear probes and kNN use),
    ``forward_head`` the projection z, ``prototype_logits`` the K scores; ``forward``
    returns all three as a :class:`CARLOutput`.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.model_config = config or ModelConfig()
        cfg = self.model_config
        self.backbone = ResNetBackbone(cfg.backbone, cfg.stem, cfg.width, cfg.zero_init_residual)
        self.num_features = self.backbone.num_features
        self.head = ProjectionHead(self.num_features, cfg.proj_hidden_dim, cfg.proj_dim)
        self.prototypes = Prototypes(cfg.proj_dim, cfg.num_prototypes, cfg.logits, cfg.temperature)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.head(features)

    def prototype_logits(self, z: Tensor) -> Tensor:
        return self.prototypes(z)

    def forward(self, x: Tensor) -> CARLOutput:
        features = self.forward_features(x)
        z = self.forward_head(features)
        return CARLOutput(features, z, self.prototype_logits(z))


def build_model(config: ModelConfig | dict[str, Any] | None = None) -> CARLModel:
    """Build a randomly initialised CARL model from a config or a plain dict."""
    if isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return CARLModel(config)
