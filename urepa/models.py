"""The U-Net side of U-REPA: feature capture at the alignment layers, the align heads, and the choice
of trainable parameters (LoRA inside the white-listed blocks, those blocks in full, or everything)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

# Where each alignment layer's feature map is read: the module whose forward output is captured.
ALIGN_LAYER_MODULES = {
    "enc_last": "down_blocks.3.resnets.-1",  # last encoder resnet, before the mid block
    "mid": "mid_block",                       # mid-block output (= its last resnet's output)
    "dec_first": "up_blocks.0.resnets.-1",    # first decoder block, before its upsampler
}
# The blocks U-REPA fine-tunes: the bottleneck and its neighbours at the lowest resolution.
TRAINABLE_BLOCKS = ("down_blocks.3", "mid_block", "up_blocks.0")
LORA_ATTENTION_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_CONV_SUFFIXES = ("conv1", "conv2", "conv_shortcut")


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """`get_submodule` that also takes negative list indices (`resnets.-1`)."""
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


def layer_channels(unet: nn.Module, layer: str) -> int:
    return get_submodule(unet, ALIGN_LAYER_MODULES[layer]).out_channels


class FeatureCapture:
    """Forward hooks that keep the captured feature maps in the autograd graph (no detach: the
    alignment loss must reach the U-Net through them). `pop` hands them over and clears the store, so
    nothing is carried from one step into the next."""

    def __init__(self, unet: nn.Module, layers: list[str]):
        unknown = set(layers) - set(ALIGN_LAYER_MODULES)
        if unknown:
            raise ValueError(f"unknown alignment layer(s) {sorted(unknown)}; known: {sorted(ALIGN_LAYER_MODULES)}")
        self.layers = list(layers)
        self.features: dict[str, torch.Tensor] = {}
        self.handles = [
            get_submodule(unet, ALIGN_LAYER_MODULES[layer]).register_forward_hook(self._store(layer))
            for layer in self.layers
        ]

    def _store(self, layer: str):
        def hook(module, inputs, output):
            self.features[layer] = output  # each captured module returns its feature map (no tuple)
        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        missing = [layer for layer in self.layers if layer not in self.features]
        if missing:
            raise RuntimeError(f"no feature captured for {missing}: was the U-Net run since the last pop?")
        features, self.features = self.features, {}
        return features

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.features = [], {}


class AlignHead(nn.Module):
    """Project a U-Net feature map to the encoder's token dimension, then upsample to its token grid,
    then L2-normalise each token: [B, C, h, w] -> [B, grid*grid, dim].

    Projecting before upsampling (the U-REPA paper's finding) keeps the upsampled map in the target
    space instead of interpolating raw U-Net channels. Projector `conv`: 1x1 conv -> GroupNorm(32) ->
    GELU; `mlp`: REPA's 3-layer SiLU MLP applied per position (as 1x1 convolutions); `conv3x3`: iREPA's
    projector (Singh et al. 2025, arXiv 2512.10794; End2End-Diffusion/iREPA, ldm/models/sit.py
    `ProjectionLayer` with `--proj-kwargs-kernel-size 3`): one 3x3 convolution with bias, padded to keep the
    map's size, so that each token's projection sees its neighbours (spatial structure) rather than itself alone.
    """

    def __init__(self, in_channels: int, dim: int, grid: int, projector: str, hidden: int):
        super().__init__()
        self.grid = grid
        if projector == "conv":
            self.proj = nn.Sequential(nn.Conv2d(in_channels, dim, 1, bias=False), nn.GroupNorm(32, dim), nn.GELU())
        elif projector == "conv3x3":
            self.proj = nn.Sequential(nn.Conv2d(in_channels, dim, 3, padding=1))
        elif projector == "mlp":
            self.proj = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1), nn.SiLU(),
                nn.Conv2d(hidden, hidden, 1), nn.SiLU(),
                nn.Conv2d(hidden, dim, 1),
            )
        else:
            raise ValueError(f"projector must be 'conv', 'conv3x3' or 'mlp', got {projector!r}")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.proj(features)
        if x.shape[-2:] != (self.grid, self.grid):
            x = F.interpolate(x, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
        return F.normalize(x.flatten(2).transpose(1, 2), dim=-1)


class AlignedUNet(nn.Module):
    """The U-Net plus one align head per alignment layer. `forward` returns the U-Net prediction and
    the aligned tokens of this very forward pass ({} when no layer is aligned). `timer`, when set, is
    a context-manager factory that charges the U-Net and the heads to separate phases (benchmarks)."""

    timer = None

    def __init__(self, unet: nn.Module, layers: list[str], dim: int, grid: int, projector: str, hidden: int):
        super().__init__()
        self.unet = unet
        self.heads = nn.ModuleDict({
            layer: AlignHead(layer_channels(unet, layer), dim, grid, projector, hidden) for layer in layers
        })
        self.capture = FeatureCapture(unet, layers) if layers else None

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor):
        phase = self.timer or (lambda name: contextlib.nullcontext())
        with phase("forward"):
            prediction = self.unet(sample, timesteps, encoder_hidden_states=encoder_hidden_states).sample
        if self.capture is None:
            return prediction, {}
        with phase("alignment"):
            features = self.capture.pop()
            return prediction, {layer: head(features[layer]) for layer, head in self.heads.items()}


def lora_target_modules(unet: nn.Module, targets: str) -> list[str]:
    """Full names of the modules LoRA adapts: attention projections (and, with `attn+conv`, resnet
    convolutions) inside the white-listed blocks only. Full names, because peft matches a bare suffix
    such as `to_q` against every module of the U-Net."""
    if targets not in ("attn", "attn+conv"):
        raise ValueError(f"lora_targets must be 'attn' or 'attn+conv', got {targets!r}")
    suffixes = LORA_ATTENTION_SUFFIXES + (LORA_CONV_SUFFIXES if targets == "attn+conv" else ())
    return [
        name for name, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
        and any(name.startswith(block + ".") for block in TRAINABLE_BLOCKS)
        and any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)
    ]


def make_trainable(unet: nn.Module, finetune: str, lora_rank: int, lora_targets: str) -> None:
    """Freeze the U-Net, then open up what the fine-tuning mode trains, in place."""
    unet.requires_grad_(False)
    if finetune == "lora":
        from peft import LoraConfig

        targets = lora_target_modules(unet, lora_targets)
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                    target_modules=targets))
    elif finetune == "partial":
        for block in TRAINABLE_BLOCKS:
            get_submodule(unet, block).requires_grad_(True)
    elif finetune == "full":
        unet.requires_grad_(True)
    else:
        raise ValueError(f"finetune must be 'lora', 'partial' or 'full', got {finetune!r}")


def speed_up(network: nn.Module, channels_last: bool, compile: bool) -> None:
    """A network's speed options, in place: NHWC memory for its convolutions, and `torch.compile` of its forward
    (`nn.Module.compile`: the parameter names, hence checkpoints and exports, stay those of the plain module; the
    U-Net's feature-capture hooks on its blocks run inside the compiled graph)."""
    if channels_last:
        network.to(memory_format=torch.channels_last)
    if compile:
        network.compile()


@contextlib.contextmanager
def ema_swapped(ema, params: list) -> None:
    """Within the block, `params` hold the EMA weights of diffusers' `EMAModel` `ema`; their own weights after."""
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
