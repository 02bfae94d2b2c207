"""Feature capture, align heads and LoRA placement (urepa.models), on the tiny smoke U-Net and on the real SD-1.5
U-Net configuration (built on the meta device: real shapes, no weights); and the align head's wiring, against a
composition written out here: project at the U-Net's own resolution, then upsample bilinearly to the encoder's
grid, then L2-normalise each token; the hooks hand the head the output of the module each alignment layer names."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from urepa.losses import alignment_loss
from urepa.models import AlignedUNet, AlignHead, FeatureCapture, TRAINABLE_BLOCKS, lora_target_modules, make_trainable
from urepa.sd15 import SD15_UNET_CONFIG, load_unet


@pytest.fixture(scope="module")
def sd15_meta_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET_CONFIG)


@pytest.mark.parametrize("projector", ["conv", "conv3x3", "mlp"])
def test_align_head_projects_then_upsamples_to_unit_tokens(projector):
    head = AlignHead(in_channels=64, dim=32, grid=8, projector=projector, hidden=48)
    tokens = head(torch.randn(3, 64, 2, 2))
    assert tokens.shape == (3, 64, 32)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(3, 64))


def test_align_head_full_scale_shapes():
    head = AlignHead(in_channels=1280, dim=1024, grid=16, projector="conv", hidden=2048)
    tokens = head(torch.randn(2, 1280, 8, 8))
    assert tokens.shape == (2, 256, 1024)
    # projection first: the upsampling acts on 1024 channels, the 1x1 conv on the 8x8 map
    assert head.proj[0].weight.shape == (1024, 1280, 1, 1)
    # 1x1 conv without bias (GroupNorm follows), GroupNorm's affine pair, nothing else
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "proj.0.weight": (1024, 1280, 1, 1), "proj.1.weight": (1024,), "proj.1.bias": (1024,)}
    assert isinstance(head.proj[2], torch.nn.GELU)
    assert head.proj[1].num_groups == 32


def test_unknown_projector_is_rejected_by_name():
    with pytest.raises(ValueError, match="projector must be 'conv', 'conv3x3' or 'mlp', got 'linear'"):
        AlignHead(in_channels=64, dim=32, grid=8, projector="linear", hidden=48)


def test_hooks_on_the_real_sd15_unet_capture_8x8x1280(sd15_meta_unet):
    capture = FeatureCapture(sd15_meta_unet, ["enc_last", "mid", "dec_first"])
    out = sd15_meta_unet(torch.empty(2, 4, 64, 64, device="meta"), torch.zeros(2, device="meta"),
                         encoder_hidden_states=torch.empty(2, 77, 768, device="meta")).sample
    assert out.shape == (2, 4, 64, 64)
    features = capture.pop()
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "enc_last": (2, 1280, 8, 8), "mid": (2, 1280, 8, 8), "dec_first": (2, 1280, 8, 8)}
    assert capture.features == {}
    with pytest.raises(RuntimeError, match="no feature captured"):
        capture.pop()
    capture.remove()
    assert not any(m._forward_hooks for m in sd15_meta_unet.modules())


def test_lora_targets_on_the_real_sd15_unet_are_inside_the_three_blocks_only(sd15_meta_unet):
    targets = lora_target_modules(sd15_meta_unet, "attn+conv")
    assert targets and all(t.startswith(TRAINABLE_BLOCKS) for t in targets)
    # SD-1.5: down_blocks.3 and up_blocks.0 have no attention; the mid block has one transformer
    # with self- and cross-attention; up_blocks.0's resnets take the skip concat, hence conv_shortcut.
    assert not any("attn" in t for t in targets if t.startswith(("down_blocks.3", "up_blocks.0")))
    assert sum(t.startswith("mid_block.attentions") for t in targets) == 8
    assert sum(t.endswith("conv_shortcut") for t in targets) == 3
    assert len(targets) == 4 + 12 + 9
    assert len(lora_target_modules(sd15_meta_unet, "attn")) == 8
    with pytest.raises(ValueError, match="lora_targets must be 'attn' or 'attn\\+conv', got 'everything'"):
        lora_target_modules(sd15_meta_unet, "everything")


@pytest.fixture
def tiny_unet(smoke_inputs):
    return load_unet(smoke_inputs["sd15"])


def test_peft_adapts_only_whitelisted_modules(tiny_unet):
    make_trainable(tiny_unet, "lora", lora_rank=4, lora_targets="attn+conv")
    lora_modules = {name.rsplit(".lora_", 1)[0] for name, _ in tiny_unet.named_parameters() if ".lora_" in name}
    assert lora_modules and all(name.startswith(TRAINABLE_BLOCKS) for name in lora_modules)
    trainable = [name for name, p in tiny_unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)


def lora_layers(unet):
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in unet.named_modules() if isinstance(module, LoraLayer)}


def test_lora_starts_as_the_base_unet_with_gaussian_a_of_the_configured_rank(tiny_unet):
    sample, timesteps, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    base = tiny_unet(sample, timesteps, encoder_hidden_states=context).sample
    torch.manual_seed(0)
    make_trainable(tiny_unet, "lora", lora_rank=4, lora_targets="attn+conv")
    # rank 4, not peft's default of 8, so that a dropped argument shows.
    # B = 0 at the start: the adapted U-Net is the pretrained one until the first step.
    torch.testing.assert_close(tiny_unet(sample, timesteps, encoder_hidden_states=context).sample, base)
    layers = lora_layers(tiny_unet)
    assert layers
    a = torch.cat([m.lora_A["default"].weight.flatten() for m in layers.values()])
    for module in layers.values():
        assert module.r["default"] == 4 and module.scaling["default"] == 1.0  # lora_alpha = rank
        assert module.lora_A["default"].weight.shape[0] == 4
        assert not module.lora_B["default"].weight.any()
    # peft's "gaussian" init: A ~ N(0, 1/r); its default (kaiming-uniform) would give std 1/sqrt(3 fan_in)
    assert a.mean().abs() < 0.02 and abs(a.std().item() - 1 / 4) < 0.02


def test_attention_only_lora_leaves_the_convolutions_alone(tiny_unet):
    make_trainable(tiny_unet, "lora", lora_rank=4, lora_targets="attn")
    names = set(lora_layers(tiny_unet))
    assert names and all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or name.endswith("to_out.0")
                         for name in names)


def test_unknown_finetuning_mode_is_rejected_by_name(tiny_unet):
    with pytest.raises(ValueError, match="finetune must be 'lora', 'partial' or 'full', got 'bitfit'"):
        make_trainable(tiny_unet, "bitfit", lora_rank=4, lora_targets="attn")


def test_mlp_heads_have_the_configured_hidden_width(tiny_unet):
    model = AlignedUNet(tiny_unet, ["mid"], dim=32, grid=8, projector="mlp", hidden=40)
    assert [tuple(m.weight.shape[:2]) for m in model.heads["mid"].proj if isinstance(m, torch.nn.Conv2d)] == [
        (40, tiny_unet.config.block_out_channels[-1]), (40, 40), (32, 40)]


def test_the_timer_charges_the_unet_and_the_heads_to_their_phases(tiny_unet):
    import contextlib

    phases = []
    model = AlignedUNet(tiny_unet, ["mid"], dim=32, grid=8, projector="conv", hidden=48)
    model.timer = lambda name: phases.append(name) or contextlib.nullcontext()
    model(torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 77, 32))
    assert phases == ["forward", "alignment"]


@pytest.mark.parametrize("mode", ["partial", "full"])
def test_partial_and_full_finetuning_open_the_right_parameters(tiny_unet, mode):
    make_trainable(tiny_unet, mode, lora_rank=4, lora_targets="attn+conv")
    trainable = {name for name, p in tiny_unet.named_parameters() if p.requires_grad}
    if mode == "partial":
        assert trainable and all(name.startswith(TRAINABLE_BLOCKS) for name in trainable)
        assert any(name.startswith("up_blocks.0") for name in trainable)
    else:
        assert len(trainable) == len(list(tiny_unet.parameters()))


def _forward_aligned(unet, layers, projector="conv"):
    torch.manual_seed(0)
    model = AlignedUNet(unet, layers, dim=32, grid=8, projector=projector, hidden=48)
    sample = torch.randn(2, 4, 16, 16)
    prediction, tokens = model(sample, torch.tensor([10, 500]), torch.randn(2, 77, 32))
    target = torch.nn.functional.normalize(torch.randn(2, 64, 32), dim=-1)
    return model, prediction, tokens, target


@pytest.mark.parametrize("projector, target_spatial_norm", [("conv", None), ("conv3x3", 0.6)])
def test_alignment_loss_alone_reaches_lora_upstream_of_the_hook(tiny_unet, projector, target_spatial_norm):
    make_trainable(tiny_unet, "lora", lora_rank=4, lora_targets="attn+conv")
    model, _, tokens, target = _forward_aligned(tiny_unet, ["mid"], projector)
    assert tokens["mid"].shape == (2, 64, 32)
    loss_align, _, _ = alignment_loss(tokens, target, manifold_coeff=3.0, target_spatial_norm=target_spatial_norm)
    loss_align.backward()
    grads = {n: p.grad for n, p in tiny_unet.named_parameters() if ".lora_" in n}

    def nonzero(prefix):
        return any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix))

    assert nonzero("down_blocks.3") and nonzero("mid_block")
    # the decoder runs after the hook: the alignment loss cannot reach it
    assert not nonzero("up_blocks.0")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())


def test_alignment_gradient_survives_gradient_checkpointing(tiny_unet):
    make_trainable(tiny_unet, "lora", lora_rank=4, lora_targets="attn+conv")
    tiny_unet.enable_gradient_checkpointing()
    tiny_unet.train()
    model, _, tokens, target = _forward_aligned(tiny_unet, ["mid", "enc_last"])
    alignment_loss(tokens, target, manifold_coeff=3.0)[0].backward()
    grads = [p.grad for n, p in tiny_unet.named_parameters() if n.startswith("mid_block") and ".lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_zero_lambda_adds_no_gradient(tiny_unet):
    make_trainable(tiny_unet, "lora", lora_rank=4, lora_targets="attn+conv")
    model, prediction, tokens, target = _forward_aligned(tiny_unet, ["mid"])
    loss_diff = prediction.pow(2).mean()
    loss_align, _, _ = alignment_loss(tokens, target, manifold_coeff=3.0)
    lora = [p for n, p in tiny_unet.named_parameters() if ".lora_" in n]
    with_zero_lambda = torch.autograd.grad(loss_diff + 0.0 * loss_align, lora, retain_graph=True)
    diff_only = torch.autograd.grad(loss_diff, lora)
    for a, b in zip(with_zero_lambda, diff_only):
        assert torch.equal(a, b)


def test_aligned_unet_without_layers_has_no_hooks_or_heads(tiny_unet):
    model = AlignedUNet(tiny_unet, [], dim=32, grid=8, projector="conv", hidden=48)
    assert len(model.heads) == 0 and not any(m._forward_hooks for m in tiny_unet.modules())
    _, tokens = model(torch.randn(1, 4, 16, 16), torch.tensor([3]), torch.randn(1, 77, 32))
    assert tokens == {}


def test_unknown_alignment_layer_is_rejected(tiny_unet):
    with pytest.raises(ValueError, match="unknown alignment layer"):
        FeatureCapture(tiny_unet, ["bottleneck"])


# -- the align head's wiring, by hand ---------------------------------------------------------------------


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


def conv3x3(x: np.ndarray, conv: torch.nn.Conv2d) -> np.ndarray:
    """A 3x3 convolution (cross-correlation) over the zero-padded map: each output position sums the weighted
    3x3 neighbourhood centred on it, plus the bias."""
    weight = conv.weight.detach().double().numpy()
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = x.shape[2:]
    out = np.zeros((x.shape[0], weight.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            out[:, :, i, j] = np.einsum("ocyx,bcyx->bo", weight, padded[:, :, i:i + 3, j:j + 3])
    return out + conv.bias.detach().double().numpy()[None, :, None, None]


def project_by_hand(head: AlignHead, projector: str, x: np.ndarray) -> np.ndarray:
    """The documented projectors: 1x1 conv -> GroupNorm(32) -> GELU, iREPA's one 3x3 conv, or three 1x1 layers
    with SiLU between."""
    if projector == "conv3x3":
        assert len(head.proj) == 1
        return conv3x3(x, head.proj[0])
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


@pytest.mark.parametrize("projector", ["conv", "conv3x3", "mlp"])
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


def test_irepa_projector_sums_each_positions_3x3_neighbourhood():
    """One input channel holding 1..9 on a 3x3 map; output channel 0 sums the neighbourhood (all-ones kernel),
    channel 1 is the bias alone (1). Centre: 1 + ... + 9 = 45; corner (0, 0): 1 + 2 + 4 + 5 = 12; edge (0, 1):
    1 + 2 + 3 + 4 + 5 + 6 = 21. Tokens are then L2-normalised."""
    head = AlignHead(in_channels=1, dim=2, grid=3, projector="conv3x3", hidden=1)
    with torch.no_grad():
        head.proj[0].weight.zero_()
        head.proj[0].weight[0] = 1.0
        head.proj[0].bias.copy_(torch.tensor([0.0, 1.0]))
    tokens = head(torch.arange(1.0, 10.0).reshape(1, 1, 3, 3))
    assert tokens.shape == (1, 9, 2)
    for position, total in [(4, 45.0), (0, 12.0), (1, 21.0), (8, 5 + 6 + 8 + 9.0)]:
        expected = torch.tensor([total, 1.0]) / math.hypot(total, 1.0)
        torch.testing.assert_close(tokens[0, position], expected)


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
