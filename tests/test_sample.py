"""Stage 4 (urepa.sample): reproducible, resumable class-balanced sampling with interval-limited guidance; and
the sampler's wiring: the guidance formula and its interval, the prompt and noise of every image, each against
values computed here. (Loading the weights a set is drawn from: tests/test_export.py.)"""
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from urepa import sample as sample_module
from urepa import sample_sets as sample_sets_module
from urepa.sample import generate_samples, initial_noise, make_sampler, sample_latents
from urepa.sample_sets import (class_of, comparison_cells, comparison_grid, gather_samples, sample_grid, sample_paths,
                               shard_count, shard_indices)
from urepa.sd15 import SD15_SCHEDULER_CONFIG


SETTINGS = {"sampler": "ddim", "steps": 3, "cfg_scale": 4.0, "guidance_low": 0.0, "guidance_high": 0.7}


@pytest.fixture(scope="module")
def clip():
    return np.random.default_rng(0).standard_normal((4, 77, 32)).astype(np.float32)  # 3 classes + null


WEIGHTS = "digest-of-the-weights"


def _sample(pipeline, clip, out, weights_digest=WEIGHTS, **overrides):
    settings = {**SETTINGS, **overrides}
    return generate_samples(pipeline, clip, null_index=3, num_classes=3, images_per_class=2, out_dir=out,
                            settings=settings, seed=5, batch_size=4, weights_digest=weights_digest,
                            vae=pipeline.vae_record)


def test_a_rerun_replaces_the_finished_set(pipeline, clip, tmp_path):
    first = {p.name: p.read_bytes() for p in _sample(pipeline, clip, tmp_path / "s").iterdir()}
    (tmp_path / "s" / "000099.png").write_bytes(b"not of this set")
    again = _sample(pipeline, clip, tmp_path / "s")
    assert {p.name for p in again.iterdir()} == set(first)
    assert all((again / name).read_bytes() == data for name, data in first.items() if name.endswith(".png"))


def test_same_seed_gives_identical_pngs(pipeline, clip, tmp_path):
    first = _sample(pipeline, clip, tmp_path / "a")
    second = _sample(pipeline, clip, tmp_path / "b")
    names = sorted(p.name for p in first.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(6)]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert not (tmp_path / "a.partial").exists()


def test_image_depends_on_its_index_not_its_batch(pipeline, clip, tmp_path):
    whole = _sample(pipeline, clip, tmp_path / "whole")
    settings = {**SETTINGS}
    one_by_one = generate_samples(pipeline, clip, 3, 3, 2, tmp_path / "single", settings, seed=5, batch_size=1,
                                  weights_digest=WEIGHTS)
    from PIL import Image
    for i in range(6):
        a = np.asarray(Image.open(whole / f"{i:06d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(one_by_one / f"{i:06d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # batched convolutions may round differently


def test_shards_are_whole_batches_of_one_grid():
    assert [shard_indices(24, 16, 2, s) for s in range(2)] == [range(0, 16), range(16, 24)]
    assert [shard_indices(10, 2, 3, s) for s in range(3)] == [range(0, 2), range(2, 6), range(6, 10)]
    assert [shard_indices(24, 16, 3, s) for s in range(3)] == [range(0, 0), range(0, 16), range(16, 24)]
    assert shard_count(12, 16, 8) == 1 and shard_count(50_000, 16, 8) == 8 and shard_count(None, 16, 8) == 8
    with pytest.raises(ValueError, match="shard 3 of 3"):
        shard_indices(24, 16, 3, 3)


def test_one_and_three_shards_give_byte_identical_images(pipeline, clip, tmp_path):
    """Sampling split into three jobs over index ranges, then gathered, writes the very bytes of one job."""
    whole = generate_samples(pipeline, clip, 3, 3, 2, tmp_path / "whole", SETTINGS, seed=5, batch_size=2,
                             weights_digest=WEIGHTS)
    shard_dirs = [generate_samples(pipeline, clip, 3, 3, 2, tmp_path / "shards" / str(s), SETTINGS, seed=5,
                                   batch_size=2, weights_digest=WEIGHTS, shards=3, shard=s) for s in (2, 0, 1)]
    assert [sorted(p.name for p in d.glob("*.png")) for d in shard_dirs] == [
        ["000004.png", "000005.png"], ["000000.png", "000001.png"], ["000002.png", "000003.png"]]
    gathered = gather_samples(shard_dirs, tmp_path / "gathered")
    names = sorted(p.name for p in gathered.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(6)]
    for name in names:
        assert (gathered / name).read_bytes() == (whole / name).read_bytes(), name
    one, three = (json.loads((d / "sampling.json").read_text()) for d in (whole, gathered))
    assert three.pop("shards") == 3 and one.pop("indices") == [0, 6] and one == three
    # who drew what: one session per shard, with the thread count and batch size that set the last bits
    sessions = json.loads((gathered / "provenance.json").read_text())
    assert sorted(s["images"] for s in sessions) == [[0, 2], [2, 4], [4, 6]]
    assert all(s["threads"] == torch.get_num_threads() and s["device"] == "cpu" for s in sessions)


def test_gathering_refuses_shards_that_do_not_make_one_set(pipeline, clip, tmp_path):
    shard = [generate_samples(pipeline, clip, 3, 3, 2, tmp_path / str(s), SETTINGS, seed=5, batch_size=2,
                              weights_digest=WEIGHTS, shards=3, shard=s) for s in range(3)]
    with pytest.raises(ValueError, match="leave images 2..3 out"):
        gather_samples([shard[0], shard[2]], tmp_path / "out")
    other = generate_samples(pipeline, clip, 3, 3, 2, tmp_path / "other", SETTINGS, seed=5, batch_size=2,
                             weights_digest="other-weights", shards=3, shard=1)
    with pytest.raises(ValueError, match=f"the shards {shard[0]}, {other}, {shard[2]} were sampled from different "
                                         f"weights or settings"):
        gather_samples([shard[0], other, shard[2]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gathering_copies_across_file_systems_and_replaces_stale_output(pipeline, clip, tmp_path, monkeypatch):
    shards = [generate_samples(pipeline, clip, 3, 3, 2, tmp_path / str(s), SETTINGS, seed=5, batch_size=2,
                               weights_digest=WEIGHTS, shards=3, shard=s) for s in range(3)]
    with pytest.raises(ValueError, match=r"the shards cover images 0\.\.3 of a set of 6"):
        gather_samples(shards[:2], tmp_path / "out")
    out = tmp_path / "nested" / "set" / "samples"
    linked = gather_samples(shards, out)
    # a rerun after a killed gather: a stale partial folder and the old output are replaced, not merged
    (out.with_name("samples.partial")).mkdir()
    (out.with_name("samples.partial") / "stale.png").write_bytes(b"")
    (out / "left-over.png").write_bytes(b"")

    def no_hard_links(source, destination):
        raise OSError("Invalid cross-device link")

    monkeypatch.setattr(sample_sets_module.os, "link", no_hard_links)
    copied = gather_samples(shards, out)
    assert sorted(p.name for p in copied.iterdir()) == [f"{i:06d}.png" for i in range(6)] + [
        "provenance.json", "sampling.json"]
    assert not out.with_name("samples.partial").exists()
    for i in range(6):
        assert (copied / f"{i:06d}.png").read_bytes() == (shards[i // 2] / f"{i:06d}.png").read_bytes()
        assert (copied / f"{i:06d}.png").stat().st_ino != (shards[i // 2] / f"{i:06d}.png").stat().st_ino
    assert linked == copied


def test_class_of_an_image_is_its_index_divided_by_the_images_per_class():
    assert [class_of(i, 3) for i in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert all(type(class_of(i, 3)) is int for i in range(7))


def test_the_guidance_interval_ends_at_the_schedules_last_noise_level():
    from diffusers import DDPMScheduler

    from urepa.sd15 import SD15_SCHEDULER_CONFIG

    alpha_bar = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    assert sample_module.noise_level(scheduler, 1.0) == pytest.approx(((1 - alpha_bar[999]) / alpha_bar[999]) ** 0.5,
                                                                      rel=1e-4)


def test_a_set_of_one_shard_is_gathered(pipeline, clip, tmp_path):
    """Small sets (a curve point of few batches) are one shard: gathering it is the set itself."""
    whole = generate_samples(pipeline, clip, 3, 3, 2, tmp_path / "whole", SETTINGS, seed=5, batch_size=8,
                             weights_digest=WEIGHTS, shards=1, shard=0)
    out = gather_samples([whole], tmp_path / "out")
    assert [p.name for p in sample_paths(out)] == [f"{i:06d}.png" for i in range(6)]
    assert json.loads((out / "sampling.json").read_text())["shards"] == 1


def test_killed_sampling_resumes_without_redoing_finished_images(pipeline, clip, tmp_path, monkeypatch, caplog):
    reference = _sample(pipeline, clip, tmp_path / "reference")
    out = tmp_path / "resumed"
    partial = tmp_path / "resumed.partial"
    partial.mkdir()
    # What a job killed after four images leaves behind: its manifest and provenance record, four PNGs and a
    # half-written one.
    _sample(pipeline, clip, tmp_path / "first")
    for record in ("sampling.json", "provenance.json"):
        (tmp_path / "first" / record).rename(partial / record)
    for i in range(4):
        (tmp_path / "first" / f"{i:06d}.png").rename(partial / f"{i:06d}.png")
    (partial / "000004.tmp.png").write_bytes(b"truncated")
    drawn = []
    original = sample_module.sample_latents

    def counting(unet, scheduler, cond, uncond, noise, *args):
        drawn.append(noise.shape[0])
        return original(unet, scheduler, cond, uncond, noise, *args)

    monkeypatch.setattr(sample_module, "sample_latents", counting)
    caplog.set_level("INFO", logger="urepa.sample")
    _sample(pipeline, clip, out)
    assert sum(drawn) == 2
    assert "resuming sampling: 1 of 2 batches already written" in caplog.text
    # who drew what: the killed job (all six images planned) and the resumed one (the last batch)
    sessions = json.loads((out / "provenance.json").read_text())
    assert [session["images"] for session in sessions] == [[0, 6], [4, 6]]
    assert all(session["dtype"] == "float32" and session["device"] == "cpu" for session in sessions)
    for i in range(6):
        assert (out / f"{i:06d}.png").read_bytes() == (reference / f"{i:06d}.png").read_bytes()
    assert not list(out.glob("*.tmp.png"))


def test_other_settings_set_the_partial_set_aside(pipeline, clip, tmp_path, caplog):
    partial = tmp_path / "s.partial"
    partial.mkdir()
    (partial / "sampling.json").write_text('{"steps": 999}')
    (partial / "000000.png").write_bytes(b"stale")
    out = _sample(pipeline, clip, tmp_path / "s")
    assert (out / "000000.png").read_bytes() != b"stale"
    assert f"{partial} was sampled from other weights or settings: moved to" in caplog.text
    (stale,) = tmp_path.glob("s.partial.stale-*")
    assert (stale / "000000.png").read_bytes() == b"stale"  # set aside, not deleted


def test_a_partial_set_of_other_weights_is_not_continued(pipeline, clip, tmp_path, monkeypatch):
    """Killed after 4 images of model A, restarted on model B (a retrained run): all 6 images come from B."""
    reference = _sample(pipeline, clip, tmp_path / "reference", weights_digest="model-B")
    _sample(pipeline, clip, tmp_path / "first", weights_digest="model-A")
    partial = tmp_path / "mixed.partial"
    partial.mkdir()
    (tmp_path / "first" / "sampling.json").rename(partial / "sampling.json")
    for i in range(4):  # stand-ins for model A's images: any bytes that B would not write
        (partial / f"{i:06d}.png").write_bytes(b"from model A")
    out = _sample(pipeline, clip, tmp_path / "mixed", weights_digest="model-B")
    for i in range(6):
        assert (out / f"{i:06d}.png").read_bytes() == (reference / f"{i:06d}.png").read_bytes()
    assert json.loads((out / "sampling.json").read_text())["weights_sha256"] == "model-B"
    assert len(list(tmp_path.glob("mixed.partial.stale-*"))) == 1


def test_the_batch_size_is_part_of_a_partial_sets_identity(pipeline, clip, tmp_path):
    partial = tmp_path / "b.partial"
    partial.mkdir()
    _sample(pipeline, clip, tmp_path / "first")
    (tmp_path / "first" / "sampling.json").rename(partial / "sampling.json")
    manifest = json.loads((partial / "sampling.json").read_text())
    assert manifest["batch_size"] == 4
    generate_samples(pipeline, clip, 3, 3, 2, tmp_path / "b", SETTINGS, seed=5, batch_size=2, weights_digest=WEIGHTS)
    assert len(list(tmp_path.glob("b.partial.stale-*"))) == 1


class RecordingUNet(torch.nn.Module):
    """Records the batch size of every call: 2B when guided, B otherwise."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, encoder_hidden_states):
        self.calls.append((int(t), x.shape[0]))
        return type("Out", (), {"sample": torch.zeros_like(x)})()


def test_guidance_is_applied_only_inside_the_interval(pipeline):
    unet = RecordingUNet()
    scheduler = sample_module.make_sampler("ddim", pipeline.scheduler.config)
    noise = torch.randn(2, 4, 8, 8)
    cond = torch.randn(2, 77, 32)
    sample_latents(unet, scheduler, cond, cond, noise, 10, cfg_scale=7.5, guidance_low=0.0, guidance_high=0.7)
    assert len(unet.calls) == 10
    for t, batch in unet.calls:
        assert batch == (4 if t / 1000 <= 0.7 else 2)
    assert {b for _, b in unet.calls} == {2, 4}


def test_samplers_follow_the_parameterisation_exported_with_the_weights(pipeline):
    assert pipeline.scheduler.config.prediction_type == "v_prediction"  # from the weights' scheduler/, not SD's
    for name in ("ddim", "euler", "dpmpp"):
        assert sample_module.make_sampler(name, pipeline.scheduler.config).config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample_module.make_sampler("heun", pipeline.scheduler.config)


def test_manifest_gives_the_guidance_interval_in_sigma(pipeline, clip, tmp_path):
    out = _sample(pipeline, clip, tmp_path / "m")
    manifest = json.loads((out / "sampling.json").read_text())
    # SD-1.5's scaled-linear betas by hand: t/T = 0.7 -> t = 700 -> sigma ~ 3.33; t = 0 -> sigma ~ 0.029.
    alpha_bar = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    sigma = np.sqrt((1 - alpha_bar) / alpha_bar)
    assert manifest["guidance_sigma_high"] == pytest.approx(sigma[700], rel=1e-4)  # diffusers keeps float32
    assert manifest["guidance_sigma_low"] == pytest.approx(sigma[0], rel=1e-4)
    assert manifest["prediction_type"] == "v_prediction"
    # the record a metrics job and a reader see: every setting the images depend on, under its own name
    sigmas = {key: manifest.pop(key) for key in ("guidance_sigma_low", "guidance_sigma_high")}
    assert manifest == {"weights_sha256": WEIGHTS, "batch_size": 4, **SETTINGS, "prediction_type": "v_prediction",
                        "seed": 5, "num_classes": 3, "images_per_class": 2, "indices": [0, 6],
                        "vae": {"name": "sd15", "fingerprint": pipeline.vae_record["fingerprint"]}}
    assert set(sigmas) == {"guidance_sigma_low", "guidance_sigma_high"}


def test_sample_grid_has_a_row_per_class(pipeline, clip, tmp_path):
    from PIL import Image

    out = _sample(pipeline, clip, tmp_path / "g")
    sample_grid(out, tmp_path / "grid.png", images_per_class=2, class_names=["a", "b", "c"], thumb=32)
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (160 + 2 * 32, 3 * 32)


def test_sample_paths_are_the_numbered_pngs_in_index_order(tmp_path):
    for name in ("000002.png", "000000.png", "000001.png", "grid.png", "sampling.json", "provenance.json"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in sample_paths(tmp_path)] == ["000000.png", "000001.png", "000002.png"]


def test_sample_grid_shows_the_first_six_images_of_the_first_sixteen_classes_under_black_labels(tmp_path):
    from PIL import Image

    def colour(index):  # one solid colour per image: a thumbnail shows which image it is
        return (index % 256, index * 7 % 256, index * 13 % 256)

    classes, per_class = 20, 7
    for i in range(classes * per_class):
        Image.new("RGB", (8, 8), colour(i)).save(tmp_path / f"{i:06d}.png")
    sample_grid(tmp_path, tmp_path / "grid.png", per_class, [f"class {c}" for c in range(classes)])
    with Image.open(tmp_path / "grid.png") as grid:
        grid = np.asarray(grid.convert("RGB"))
    assert grid.shape == (16 * 128, 160 + 6 * 128, 3)
    for c, j in [(0, 0), (3, 2), (15, 5)]:
        assert tuple(grid[c * 128 + 64, 160 + j * 128 + 64]) == colour(c * per_class + j)
    labels = grid[:, :160]
    assert (labels[0, 0] == 255).all()  # a white label column ...
    assert (labels[:128].max(axis=-1) < 64).any()  # ... with the class name written in black


def test_a_comparison_grid_row_is_one_index_of_each_final_set_drawn_from_one_noise_and_prompt(
        pipeline, clip, smoke_inputs, tmp_path, monkeypatch):
    """SD-1.5 as it is and a fine-tuned U-Net, each sampled as the workflow draws a final set (the chosen seed): the
    noise and prompt every image was drawn from, recorded where the sampler receives them, are one for a row's
    cells, and are `initial_noise` of the index and seed the sets' sampling.json give; the cells are those images."""
    from urepa.export import load_finetuned_pipeline, save_pretrained_description
    from urepa.vae import vae_record

    sd15 = smoke_inputs["sd15"]
    save_pretrained_description(tmp_path / "pretrained", sd15, vae_record("sd15", sd15 / "vae"))
    pretrained = load_finetuned_pipeline(sd15, tmp_path / "pretrained", torch.device("cpu"))
    received, draw = {}, sample_module.sample_latents

    def recording_sample_latents(unet, scheduler, cond, uncond, noise, *rest):
        received.setdefault(unet, []).append((cond.clone(), noise.clone()))  # batches come in index order
        return draw(unet, scheduler, cond, uncond, noise, *rest)

    monkeypatch.setattr(sample_module, "sample_latents", recording_sample_latents)
    sets = {"pretrained": _sample(pretrained, clip, tmp_path / "p"), "partial": _sample(pipeline, clip, tmp_path / "f")}
    drawn = {label: [torch.cat(parts) for parts in zip(*received[pipe.unet])]
             for label, pipe in [("pretrained", pretrained), ("partial", pipeline)]}  # [prompts, noises]
    thumb = 16
    cells = comparison_grid(sets, tmp_path / "grid.png", ["a", "b", "c"], rows=2, thumb=thumb)
    assert cells == [(0, 0), (2, 4)]  # 2 of the 3 classes, first and last; the first image of each
    with Image.open(tmp_path / "grid.png") as grid:
        grid = np.asarray(grid.convert("RGB"))
    assert grid.shape == (24 + 2 * thumb, 160 + 2 * thumb, 3)
    for row, (_, index) in enumerate(cells):
        (prompt, noise), (other_prompt, other_noise) = ([d[index] for d in drawn[label]] for label in sets)
        assert torch.equal(noise, other_noise) and torch.equal(prompt, other_prompt)
        for column, folder in enumerate(sets.values()):
            seed = json.loads((folder / "sampling.json").read_text())["seed"]
            assert torch.equal(drawn[list(sets)[column]][1][index], initial_noise(index, seed, tuple(noise.shape)))
            with Image.open(folder / f"{index:06d}.png") as image:
                expected = np.asarray(image.convert("RGB").resize((thumb, thumb), Image.BICUBIC))
            top, left = 24 + row * thumb, 160 + column * thumb
            assert np.array_equal(grid[top:top + thumb, left:left + thumb], expected)
        assert not np.array_equal(grid[24 + row * thumb:24 + (row + 1) * thumb, 160:160 + thumb],
                                  grid[24 + row * thumb:24 + (row + 1) * thumb, 160 + thumb:160 + 2 * thumb])


def _manifest(folder, **values):
    folder.mkdir()
    (folder / "sampling.json").write_text(json.dumps({"seed": 0, "num_classes": 10, "images_per_class": 5, **values}))
    return folder


def test_the_comparison_grid_spreads_its_rows_over_the_classes(tmp_path):
    sets = {"pretrained": _manifest(tmp_path / "p"), "urepa": _manifest(tmp_path / "u", steps=25)}
    assert comparison_cells(sets, rows=4) == [(0, 0), (3, 15), (6, 30), (9, 45)]  # class c: image 5 c
    assert comparison_cells(sets, rows=1) == [(0, 0)]
    assert [c for c, _ in comparison_cells(sets, rows=8)] == [0, 1, 3, 4, 5, 6, 8, 9]  # round(9 i / 7)
    assert [c for c, _ in comparison_cells(sets, rows=20)] == list(range(10))  # fewer classes than rows: all


@pytest.mark.parametrize("key, value", [("seed", 1), ("images_per_class", 4), ("num_classes", 9)])
def test_sets_whose_index_is_not_one_noise_and_prompt_make_no_comparison_grid(tmp_path, key, value):
    sets = {"pretrained": _manifest(tmp_path / "p"), "urepa": _manifest(tmp_path / "u", **{key: value})}
    with pytest.raises(ValueError, match=f"differ in {key} .*share their initial noise and prompt"):
        comparison_cells(sets, rows=8)


# -- the sampler's wiring, against values computed here -------------------------------------------------


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
