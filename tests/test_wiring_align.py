"""The align head's wiring, against a composition written out here: project at the U-Net's own resolution,
then upsample bilinearly to the encoder's grid, then L2-normalise each token; and the hooks hand the head
the output of the module each alignment layer names."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from urepa.models import AlignedUNet, AlignHead
from urepa.sd15 import load_unet

GRID, DIM, HIDDEN = 4, 32, 16


def bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """[B, C, h, w] -> [B, C, size, size], half-pixel centres (align_corners=False), edges clamped."""
    def weights(n_in: int) -> np.ndarray:
        matrix = np.zeros((size, n_in))
        for i in range(size):
            source = max((i + 0.5) * n_in / size - 0.5, 0.0)
            low = min(int(math.floor(source)), n_in - 1)
            high = min(low + 1, n_in - 1)
            matrix[i, low] += 1 - (source - low)
            matrix[i, high] += source - low
        return matrix

    rows, cols = weights(x.shape[2]), weights(x.shape[3])
    return np.einsum("ih,bchw,jw->bcij", rows, x, cols)


def conv1x1(x: np.ndarray, conv: torch.nn.Conv2d) -> np.ndarray:
    out = np.einsum("oc,bchw->bohw", conv.weight.detach().double().numpy()[:, :, 0, 0], x)
    return out if conv.bias is None else out + conv.bias.detach().double().numpy()[None, :, None, None]


def project_by_hand(head: AlignHead, projector: str, x: np.ndarray) -> np.ndarray:
    """The documented projectors: 1x1 conv -> GroupNorm(32) -> GELU, or three 1x1 layers with SiLU between."""
    if projector == "conv":
        y = conv1x1(x, head.proj[0])
        b, c, h, w = y.shape
        groups = y.reshape(b, 32, c // 32, h, w)
        mean, var = groups.mean(axis=(2, 3, 4), keepdims=True), groups.var(axis=(2, 3, 4), keepdims=True)
        y = ((groups - mean) / np.sqrt(var + 1e-5)).reshape(b, c, h, w)
        norm = head.proj[1]
        y = y * norm.weight.detach().double().numpy()[None, :, None, None] + \
            norm.bias.detach().double().numpy()[None, :, None, None]
        erf = np.vectorize(math.erf)
        return 0.5 * y * (1 + erf(y / math.sqrt(2)))
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    convs = [m for m in head.proj if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and convs[0].out_channels == convs[1].out_channels == HIDDEN
    return conv1x1(silu(conv1x1(silu(conv1x1(x, convs[0])), convs[1])), convs[2])


def tokens_by_hand(head: AlignHead, projector: str, features: torch.Tensor) -> np.ndarray:
    projected = project_by_hand(head, projector, features.detach().double().numpy())
    if projected.shape[-1] != GRID:
        projected = bilinear(projected, GRID)
    tokens = projected.reshape(len(projected), DIM, GRID * GRID).transpose(0, 2, 1)  # row-major grid positions
    return tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)


def randomised(head: AlignHead) -> AlignHead:
    """Non-trivial affine GroupNorm parameters, so a missing or misplaced norm shows."""
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return head


@pytest.mark.parametrize("projector", ["conv", "mlp"])
@pytest.mark.parametrize("side", [2, GRID])
def test_head_projects_at_the_unets_resolution_then_upsamples_then_normalises(projector, side):
    torch.manual_seed(0)
    head = randomised(AlignHead(in_channels=64, dim=DIM, grid=GRID, projector=projector, hidden=HIDDEN))
    seen = []
    head.proj.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    features = torch.randn(3, 64, side, side)
    tokens = head(features)
    assert seen == [(3, 64, side, side)], "the projector must see the U-Net's own feature map"
    assert tokens.shape == (3, GRID * GRID, DIM)
    np.testing.assert_allclose(tokens.detach().double().numpy(), tokens_by_hand(head, projector, features), atol=2e-5)


LAYER_MODULES = {  # by hand, from the design: where each alignment layer reads the U-Net
    "enc_last": lambda unet: unet.down_blocks[3].resnets[-1],
    "mid": lambda unet: unet.mid_block,
    "dec_first": lambda unet: unet.up_blocks[0].resnets[-1],
}


@pytest.mark.parametrize("layer", sorted(LAYER_MODULES))
def test_each_layers_head_gets_that_modules_output_in_the_graph(smoke_inputs, layer):
    unet = load_unet(smoke_inputs["sd15"])
    torch.manual_seed(0)
    model = AlignedUNet(unet, [layer], DIM, GRID, "conv", HIDDEN)
    outputs, head_inputs = [], []
    LAYER_MODULES[layer](unet).register_forward_hook(lambda module, args, output: outputs.append(output))
    model.heads[layer].proj.register_forward_pre_hook(lambda module, args: head_inputs.append(args[0]))
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    _, tokens = model(latents, torch.tensor([10, 600]), torch.randn(2, 77, unet.config.cross_attention_dim))
    (output,), (head_input,) = outputs, head_inputs
    assert head_input is output  # that module's output itself, not a copy cut from the graph
    assert head_input.requires_grad and head_input.shape[-2:] == (2, 2)
    np.testing.assert_allclose(tokens[layer].detach().double().numpy(),
                               tokens_by_hand(model.heads[layer], "conv", output), atol=2e-5)
