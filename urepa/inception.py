"""The TF 2015 Inception-v3 graph's structure as clean-fid's / StyleGAN2-ADA's TorchScript
(`inception-2015-12-05.pt`) names it, with random weights: the rehearsal tier's stand-in for that file,
so that `urepa.feature_networks.InceptionFeatures` loads and walks it exactly as it does the real one.

Blocks and names follow the graph: a stem (`conv` .. `pool1`), `mixed` .. `mixed_2` (35 x 35),
`mixed_3` (to 17 x 17), `mixed_4` .. `mixed_7` (17 x 17; `mixed_6.conv` is ADM's sFID tap), `mixed_8`
(to 8 x 8), `mixed_9`, `mixed_10`, `pool2` (2048) and a 1008-way `output`. Every convolution is
conv (no bias) -> batch norm (eps 1e-3) -> ReLU, torchvision's `BasicConv2d`. The numbers it gives are
not Inception's: only the shapes and the code path are real.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import BasicConv2d


def conv(in_channels: int, out_channels: int, kernel, stride: int = 1, padding=0) -> BasicConv2d:
    return BasicConv2d(in_channels, out_channels, kernel_size=kernel, stride=stride, padding=padding)


def chain(*modules: nn.Module, last: tuple[str, nn.Module] | None = None) -> nn.Sequential:
    """A TF tower: its convolutions are named conv, conv_1, conv_2, ... (then an optional named module)."""
    named = [("conv" if i == 0 else f"conv_{i}", module) for i, module in enumerate(modules)]
    return nn.Sequential(OrderedDict(named + ([last] if last else [])))


def avg_pool() -> nn.AvgPool2d:
    # TF's 'SAME' average pool leaves the padding out of the mean.
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class Mixed(nn.Sequential):
    """An inception block: every named branch reads the block's input; outputs concatenated on channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for branch in self:
            outputs.append(branch(x))
        return torch.cat(outputs, 1)


def mixed(**branches: nn.Module) -> Mixed:
    return Mixed(OrderedDict(branches))


def block_35(channels: int, pool_features: int) -> Mixed:
    return mixed(conv=conv(channels, 64, 1),
                 tower=chain(conv(channels, 48, 1), conv(48, 64, 5, padding=2)),
                 tower_1=chain(conv(channels, 64, 1), conv(64, 96, 3, padding=1), conv(96, 96, 3, padding=1)),
                 tower_2=nn.Sequential(OrderedDict(pool=avg_pool(), conv=conv(channels, pool_features, 1))))


def block_35_to_17(channels: int) -> Mixed:
    return mixed(conv=conv(channels, 384, 3, stride=2),
                 tower=chain(conv(channels, 64, 1), conv(64, 96, 3, padding=1), conv(96, 96, 3, stride=2)),
                 pool=nn.MaxPool2d(3, stride=2))


def block_17(channels: int, width: int) -> Mixed:
    """`width`: the factorised 7x7 towers' inner width (128, 160, 160, 192 in mixed_4 .. mixed_7)."""
    return mixed(conv=conv(channels, 192, 1),
                 tower=chain(conv(channels, width, 1), conv(width, width, (1, 7), padding=(0, 3)),
                             conv(width, 192, (7, 1), padding=(3, 0))),
                 tower_1=chain(conv(channels, width, 1), conv(width, width, (7, 1), padding=(3, 0)),
                               conv(width, width, (1, 7), padding=(0, 3)), conv(width, width, (7, 1), padding=(3, 0)),
                               conv(width, 192, (1, 7), padding=(0, 3))),
                 tower_2=nn.Sequential(OrderedDict(pool=avg_pool(), conv=conv(channels, 192, 1))))


def block_17_to_8(channels: int) -> Mixed:
    return mixed(tower=chain(conv(channels, 192, 1), conv(192, 320, 3, stride=2)),
                 tower_1=chain(conv(channels, 192, 1), conv(192, 192, (1, 7), padding=(0, 3)),
                               conv(192, 192, (7, 1), padding=(3, 0)), conv(192, 192, 3, stride=2)),
                 pool=nn.MaxPool2d(3, stride=2))


def block_8(channels: int, pool: nn.Module) -> Mixed:
    """`pool`: average in mixed_9, max in mixed_10 (a quirk of the 2015 graph that FID inherits)."""
    def split(width: int) -> Mixed:
        return mixed(conv=conv(width, 384, (1, 3), padding=(0, 1)), conv_1=conv(width, 384, (3, 1), padding=(1, 0)))

    return mixed(conv=conv(channels, 320, 1),
                 tower=chain(conv(channels, 384, 1), last=("mixed", split(384))),
                 tower_1=chain(conv(channels, 448, 1), conv(448, 384, 3, padding=1), last=("mixed", split(384))),
                 tower_2=nn.Sequential(OrderedDict(pool=pool, conv=conv(channels, 192, 1))))


class TFInceptionV3(nn.Module):
    """`layers` (299 px in, 2048 x 1 x 1 out) and the 1008-way `output` layer of the 2015 graph."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(OrderedDict([
            ("conv", conv(3, 32, 3, stride=2)), ("conv_1", conv(32, 32, 3)), ("conv_2", conv(32, 64, 3, padding=1)),
            ("pool0", nn.MaxPool2d(3, stride=2)), ("conv_3", conv(64, 80, 1)), ("conv_4", conv(80, 192, 3)),
            ("pool1", nn.MaxPool2d(3, stride=2)),
            ("mixed", block_35(192, 32)), ("mixed_1", block_35(256, 64)), ("mixed_2", block_35(288, 64)),
            ("mixed_3", block_35_to_17(288)),
            ("mixed_4", block_17(768, 128)), ("mixed_5", block_17(768, 160)), ("mixed_6", block_17(768, 160)),
            ("mixed_7", block_17(768, 192)),
            ("mixed_8", block_17_to_8(768)),
            ("mixed_9", block_8(1280, avg_pool())), ("mixed_10", block_8(2048, nn.MaxPool2d(3, stride=1, padding=1))),
            ("pool2", nn.AvgPool2d(8)),
        ]))
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        """Class probabilities (or pool3 features) of 299 x 299 images with values in 0..255."""
        features = self.layers((img - 128) / 128).reshape(-1, 2048)
        return features if return_features else F.softmax(self.output(features), 1)


def save_random_inception(path: str | Path, seed: int = 0) -> Path:
    """A seeded random `TFInceptionV3`, scripted and saved as TorchScript at `path`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TFInceptionV3()
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                # He init keeps activations at unit scale through ~50 ReLU layers (PyTorch's default init
                # shrinks them layer by layer until the pooled features are all but constant).
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path
