"""The sampler's wiring: the guidance formula and its interval, the prompt and noise of every image, and
the weights a sample set is drawn from, each against values computed here."""
from __future__ import annotations

import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from urepa import sample as sample_module
from urepa.sample import generate_samples, initial_noise, make_sampler, sample_latents
from urepa.sd15 import SD15_SCHEDULER_CONFIG

REPO = Path(__file__).resolve().parents[1]


class ConditionOnlyUNet(torch.nn.Module):
    """A U-Net stand-in whose output depends only on the condition: channel c of image b is the mean of
    its prompt embedding's token c, everywhere (whatever the input and the timestep)."""

    def forward(self, x, t, encoder_hidden_states):
        value = encoder_hidden_states[:, :x.shape[1]].mean(dim=-1)  # [B, C]
        return types.SimpleNamespace(sample=value[:, :, None, None].expand_as(x).clone())


class RecordingScheduler:
    """A diffusers scheduler that records the model output handed to each step."""

    def __init__(self, scheduler):
        self.scheduler, self.outputs = scheduler, []

    def __getattr__(self, name):
        return getattr(self.scheduler, name)

    def step(self, model_output, t, latents):
        self.outputs.append((int(t), model_output.clone()))
        return self.scheduler.step(model_output, t, latents)


@pytest.fixture(scope="module")
def trained_config():
    """SD-1.5's schedule as a run exports it for its sampler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).config


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_guided_output_is_uncond_plus_scale_times_cond_minus_uncond_inside_the_interval_and_cond_outside(
        trained_config, sampler):
    scheduler = RecordingScheduler(make_sampler(sampler, trained_config))
    scheduler.set_timesteps(10)
    timesteps = [int(t) for t in scheduler.timesteps]
    # interval ends on two of the sampler's own timesteps: both ends belong to it
    low, high = timesteps[7] / 1000, timesteps[3] / 1000
    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 77, 8, generator=generator), torch.randn(3, 77, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    scale = 4.0
    sample_latents(ConditionOnlyUNet(), scheduler, cond, uncond, noise, 10, scale, low, high)

    c, u = cond[:, :4].mean(-1)[:, :, None, None], uncond[:, :4].mean(-1)[:, :, None, None]
    assert [t for t, _ in scheduler.outputs] == timesteps
    inside = [t for t in timesteps if low <= t / 1000 <= high]
    assert len(inside) == 5 and len(timesteps) - len(inside) == 5
    for t, output in scheduler.outputs:
        expected = u + scale * (c - u) if t in inside else c
        torch.testing.assert_close(output, expected.expand_as(output), rtol=1e-5, atol=1e-5)


def test_each_image_is_drawn_from_its_classs_prompt_and_its_own_noise(trained_config, tmp_path, monkeypatch):
    """Through the whole of generate_samples, in batches that cut across classes: image i gets the prompt
    of class i // images_per_class, the null prompt as the unconditional one, the noise of index i and the
    configured sampler settings, and is written as i's PNG."""
    from diffusers import DDPMScheduler

    num_classes, per_class, seed, size = 3, 2, 7, 8
    clip = np.random.default_rng(0).standard_normal((num_classes + 1, 77, 8)).astype(np.float32)
    null = num_classes
    noises = torch.stack([initial_noise(i, seed, (4, size, size)) for i in range(num_classes * per_class)])
    settings = {"sampler": "ddim", "steps": 4, "cfg_scale": 2.5, "guidance_low": 0.1, "guidance_high": 0.6}

    def identifying_sample_latents(unet, scheduler, cond, uncond, noise, steps, cfg_scale, low, high):
        """Latents that say which prompt and which noise each image got."""
        assert (steps, cfg_scale, low, high) == (4, 2.5, 0.1, 0.6)
        assert scheduler.config.prediction_type == trained_config.prediction_type
        assert cond.dtype == uncond.dtype == noise.dtype == unet.dtype  # the U-Net's own dtype (fp16 on CUDA)
        assert all(torch.equal(row.float(), torch.from_numpy(clip[null])) for row in uncond)
        latents = torch.zeros(len(cond), 4, size, size)
        for b in range(len(cond)):
            (latents[b, 0, 0, 0],) = [k for k in range(len(clip))
                                      if torch.equal(cond[b].float(), torch.from_numpy(clip[k]))]
            (latents[b, 1, 0, 0],) = [i for i in range(len(noises)) if torch.equal(noise[b].float(), noises[i])]
        return latents

    def identifying_decode(vae, latents):
        images = np.zeros((len(latents), 8, 8, 3), np.uint8)
        images[:, 0, 0, :2] = latents[:, :2, 0, 0].numpy()
        return images

    monkeypatch.setattr(sample_module, "sample_latents", identifying_sample_latents)
    monkeypatch.setattr(sample_module, "decode", identifying_decode)
    unet = torch.nn.Linear(1, 1)
    unet.config = types.SimpleNamespace(in_channels=4, sample_size=size)
    unet.device, unet.dtype = torch.device("cpu"), torch.float64  # not the inputs' float32
    pipe = types.SimpleNamespace(unet=unet, vae=None, scheduler=DDPMScheduler.from_config(trained_config))
    out = generate_samples(pipe, clip, null, num_classes, per_class, tmp_path / "samples", settings, seed,
                           batch_size=4, weights_digest="w")
    for i in range(num_classes * per_class):
        pixel = np.asarray(Image.open(out / f"{i:06d}.png"))[0, 0]
        assert (pixel[0], pixel[1]) == (i // per_class, i), f"image {i}: class {pixel[0]}, noise {pixel[1]}"


def test_initial_noise_is_per_index_and_seed():
    first = initial_noise(3, 5, (4, 8, 8))
    assert torch.equal(first, initial_noise(3, 5, (4, 8, 8)))
    assert not torch.equal(first, initial_noise(4, 5, (4, 8, 8)))
    assert not torch.equal(first, initial_noise(3, 6, (4, 8, 8)))
    assert abs(float(first.mean())) < 0.2 and abs(float(first.std()) - 1) < 0.2
    # Pinned: a partial set is resumed image by image, so the noise of (index, seed) may never change
    # between versions (torch's CPU generator seeded with seed * 1_000_003 + index).
    torch.testing.assert_close(initial_noise(3, 5, (4,)), torch.tensor([0.20378858, 0.91243392, -0.78203511,
                                                                        0.94386351]), rtol=0, atol=1e-7)
    assert torch.equal(initial_noise(3, 5, (4,)),
                       torch.randn(4, generator=torch.Generator().manual_seed(5 * 1_000_003 + 3)))


def test_sample_sets_are_drawn_from_the_ema_weights(tmp_path, monkeypatch):
    """The final set and every CFG-sweep point load the run's EMA export; FID-vs-step points its EMA
    snapshots. Read from the rules as Snakemake loads them, for one job's wildcards."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ResourceSettings

    shutil.copytree(REPO / "config", tmp_path / "config")
    monkeypatch.chdir(tmp_path)  # Snakemake enters the workdir; the test's teardown leaves it
    with SnakemakeApi() as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=REPO / "Snakefile",
                                workdir=tmp_path)._workflow

        def weights(sample_set: str) -> tuple[str, str]:
            """(weights folder, model folder) of a sampling job of the sample set."""
            rule = workflow.get_rule("sample_shard")
            values = {name: "x" for name in rule.wildcard_names}
            values.update(tier="smoke", ablation="urepa", seed="0", set=sample_set, shard="0", shards="1")
            param = rule.params["weights"]
            folder = param(types.SimpleNamespace(**values)) if callable(param) else param.format(**values)
            return folder, rule.input["model"].format(**values)

        folder, model = weights("final")
        assert folder == f"{model}/ema"
        folder, model = weights("cfg_sweep/cfg-1.5")
        assert folder == f"{model}/ema"
        folder, model = weights("curve/step-40")
        assert folder == f"{model}/snapshots/step-0000040"
