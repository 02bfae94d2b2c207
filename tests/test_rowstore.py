"""The row store under every image cache (urepa.rowstore): metadata checks, corrupt images recorded as invalid
rows, sharded storage, builds split into parts, resume after a kill, sealing, and the training-time reader.

The shared caches (conftest's `smoke_caches`) are built once per session from the smoke inputs at small sizes: VAE at 128 px
(latents 4x16x16), DINOv2 at resize 64 / crop 56 (a 4x4 token grid), CLIP for the tree's classes.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image
from torch.utils.data import DataLoader

from conftest import CACHE_BATCH, CPU, DINO_SIZE, REPO, SMOKE_IMAGE_SIZE, as_float
from urepa import generated, rowstore
from urepa import vae as vae_module
from urepa.batches import StepBatches
from urepa.caches import build_dino_cache, build_vae_cache
from urepa.digests import file_digest, weights_fingerprint
from urepa.rowstore import (
    FINISHED,
    STORE,
    CacheBuildError,
    CachedRows,
    CacheMismatchError,
    build_folder,
    check_cache,
    open_cache,
    seal_cache,
    valid_rows,
)

BATCH = CACHE_BATCH
LOAD_VAE = vae_module.load_autoencoder  # the real loader, for wrappers to call whatever is patched in


SHARD = 2 * BATCH  # rows per shard of the sharded test builds: the 30-row subset makes shards 0-3, the last of 6 rows


def build_vae(csv, out, sd15_dir, batch_size=BATCH, **sharding):
    return build_vae_cache(csv, out, Path(sd15_dir) / "vae", SMOKE_IMAGE_SIZE, batch_size, 0, CPU, **sharding)


def build_dino(csv, out, dinov2_dir, batch_size=BATCH, **sharding):
    return build_dino_cache(csv, out, dinov2_dir, SMOKE_IMAGE_SIZE, DINO_SIZE, batch_size, 0, CPU, **sharding)


BUILDERS = {"vae": (build_vae, "sd15"), "dino": (build_dino, "dinov2")}


def bits(values) -> np.ndarray:
    """Bitwise view, so that NaN == NaN when comparing fp16 arrays."""
    values = np.ascontiguousarray(values)
    return values.view(np.uint16) if values.dtype == np.float16 else values


# -- metadata checks ----------------------------------------------------------------------------------


def test_check_cache_accepts_matching_inputs(built, smoke_inputs):
    digest = file_digest(built["csv"])
    check_cache(built["vae"], {"csv_sha256": digest,
                               "encoder_fingerprint": weights_fingerprint(smoke_inputs["sd15"] / "vae")})
    group = check_cache(built["dino"], {"csv_sha256": digest, "grid": 4,
                                        "encoder_fingerprint": weights_fingerprint(smoke_inputs["dinov2"])})
    assert group["tokens"].shape[0] == len(built["table"])


def test_check_cache_rejects_another_csv(built, tmp_path):
    modified = tmp_path / "subset.csv"
    built["table"].iloc[:-1].to_csv(modified, index=False)  # one image fewer
    for cache in (built["vae"], built["dino"]):
        with pytest.raises(CacheMismatchError, match="csv_sha256") as error:
            check_cache(cache, {"csv_sha256": file_digest(modified)})
        assert str(cache) in str(error.value)


def test_check_cache_rejects_another_encoder(built, tmp_path):
    other = generated.make_dinov2(tmp_path / "other_dinov2", seed=1)  # same architecture, other weights
    with pytest.raises(CacheMismatchError, match="encoder_fingerprint"):
        check_cache(built["dino"], {"encoder_fingerprint": weights_fingerprint(other)})
    with pytest.raises(CacheMismatchError, match="grid"):
        check_cache(built["dino"], {"grid": 16})


# -- corrupt, truncated and missing images ------------------------------------------------------------


def test_unreadable_images_are_recorded_as_invalid_rows(built, smoke_inputs, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    table = built["table"].iloc[:7].copy()
    table["img_path"] = [shutil.copy(p, images / Path(p).name) for p in table["img_path"]]
    truncated = images / "truncated.JPEG"
    data = Path(table["img_path"].iloc[0]).read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    garbage = images / "garbage.JPEG"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    missing = images / "missing.JPEG"
    tiny = images / "tiny.JPEG"  # opens fine, but a 1x1 image carries nothing to encode at 128 px
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tiny)
    # Batches of 2: (0, 1) (2, 3) (4, 5*) (6*, 7*) (8, 9*): two batches part bad, one wholly bad.
    bad = {5: truncated, 6: garbage, 7: missing, 9: tiny}
    rows = []
    for i in range(10):
        source = table.iloc[min(i, 6)].copy()
        if i in bad:
            source["img_path"], source["id"] = str(bad[i]), bad[i].stem
        rows.append(source)
    csv = tmp_path / "subset.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)

    vae = open_cache(build_vae(csv, tmp_path / "vae.zarr", smoke_inputs["sd15"], batch_size=2))
    dino = open_cache(build_dino(csv, tmp_path / "dino.zarr", smoke_inputs["dinov2"], batch_size=2))
    good = np.array(sorted(set(range(10)) - set(bad)))
    for group, names in ((vae, ("mean", "std")), (dino, ("tokens",))):
        np.testing.assert_array_equal(np.flatnonzero(group["valid"][:]), good)
        for name in names:
            values = as_float(group[name][:])
            assert np.isnan(values[sorted(bad)]).all(), f"{name}: invalid rows must hold NaN, not data or zeros"
            assert np.isfinite(values[good]).all()
        errors = group.attrs["errors"]
        assert group.attrs["num_invalid"] == len(bad)
        assert {e["row"]: e["path"] for e in errors} == {row: str(path) for row, path in bad.items()}
        reasons = {e["row"]: e["error"] for e in errors}
        assert "FileNotFoundError" in reasons[7]
        assert "1x1 px is smaller than 32 px on a side" in reasons[9]
        assert all(reasons[row] for row in bad)
    np.testing.assert_array_equal(valid_rows(vae, dino), good)
    # The good rows are the same images as in the main caches, so they encode to the same tokens.
    main_tokens = as_float(open_cache(built["dino"])["tokens"][:7])
    np.testing.assert_allclose(as_float(dino["tokens"][:5]), main_tokens[:5], atol=2e-3)


# -- sharded storage and builds split into parts --------------------------------------------------------


def files_in(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def finished_shards(folder: Path) -> set[int]:
    return {int(p.stem) for p in (folder / FINISHED).glob("*.json")}


def shard_file(folder: Path, array: str, shard: int) -> Path:
    """Where zarr keeps shard `shard` of a [rows, 4, h, w] array of a build's store (default chunk key encoding)."""
    return folder / STORE / array / "c" / str(shard) / "0" / "0" / "0"


@pytest.fixture(scope="module")
def three_part_builds(smoke_caches, smoke_inputs, tmp_path_factory) -> dict[str, Path]:
    """The shared subset's VAE and DINOv2 caches built as three part jobs (run out of order) into shards of
    SHARD rows, then sealed."""
    root = tmp_path_factory.mktemp("three_parts")
    sealed = {}
    for name, (build, model) in BUILDERS.items():
        path = root / f"{name}.zarr"
        for part in (2, 0, 1):
            assert build(smoke_caches["csv"], path, smoke_inputs[model], shard_rows=SHARD, part=(part, 3)) \
                == build_folder(path)
        assert not path.exists() and finished_shards(build_folder(path)) == {0, 1, 2, 3}
        sealed[name] = seal_cache(path)
        assert not build_folder(path).exists()
    return sealed


@pytest.mark.parametrize("name", ["vae", "dino"])
def test_a_three_part_build_equals_the_one_job_build(three_part_builds, built, name):
    """Every array's bytes, the valid mask and the attributes are the same, although the one-job build holds
    each array in one shard and the three-part build in four."""
    parts, whole = open_cache(three_part_builds[name]), open_cache(built[name])
    names = sorted(whole.array_keys())
    assert sorted(parts.array_keys()) == names and "valid" in names
    for array in names:
        np.testing.assert_array_equal(bits(parts[array][:]), bits(whole[array][:]), err_msg=array)
    assert dict(parts.attrs) == dict(whole.attrs)
    data = [array for array in names if array not in rowstore.NOT_DATA]
    assert {parts[array].shards[0] for array in data} == {SHARD}
    assert {whole[array].shards[0] for array in data} == {rowstore.SHARD_ROWS}
    assert parts.attrs["data_sha256"] == {array: hashlib.sha256(whole[array][:].tobytes()).hexdigest() for array in data}


def test_smoke_sized_caches_are_a_few_files(built, three_part_builds):
    # A file per row per array (the layout before sharding) would make 60 data files of the 30-row VAE cache.
    for path in (built["vae"], built["dino"], built["clip"], *three_part_builds.values()):
        assert len(files_in(path)) <= 30, path
    # zarr.json of the group, mean, std, valid and row_crc32c; 4 shards of mean and of std; valid in one chunk; the
    # row checksums in a chunk per shard.
    assert len(files_in(three_part_builds["vae"])) == 5 + 2 * 4 + 1 + 4
    assert len(files_in(built["vae"])) == 5 + 2 * 1 + 1 + 1


def test_sharded_rows_read_the_same_as_a_file_per_row(three_part_builds, tmp_path):
    """CachedRows over sharded arrays returns what it returns from the previous layout (one chunk file per row)."""
    copies = {}
    for name, path in three_part_builds.items():
        source = zarr.open_group(str(path), mode="r")
        copies[name] = tmp_path / path.name
        copy = zarr.open_group(str(copies[name]), mode="w")
        for array in source.array_keys():
            copy.create_array(array, data=source[array][:], chunks=(1, *source[array].shape[1:]))
        assert copy["tokens" if name == "dino" else "mean"].shards is None
    class_ids = np.arange(30) % 3
    rows = np.array([29, 0, 7, 8, 15, 16, 24, 3, 8])  # shard edges, the short last shard, a row twice
    sharded = CachedRows(three_part_builds["vae"], three_part_builds["dino"], class_ids)[rows]
    per_row = CachedRows(copies["vae"], copies["dino"], class_ids)[rows]
    assert set(sharded) == set(per_row)
    for key, values in per_row.items():
        np.testing.assert_array_equal(bits(sharded[key].numpy()), bits(values.numpy()), err_msg=key)


def test_sealing_checks_every_shard_and_row(built, smoke_inputs, tmp_path, monkeypatch):
    out = tmp_path / "vae_latents.zarr"
    folder = build_folder(out)
    build_vae(built["csv"], out, smoke_inputs["sd15"], shard_rows=SHARD, part=(0, 3))  # shard 0
    build_vae(built["csv"], out, smoke_inputs["sd15"], shard_rows=SHARD, part=(1, 3))  # shard 1
    with pytest.raises(CacheBuildError, match=r"2 of 4 shards .* are not finished \(2, 3\)"):
        seal_cache(out)
    build_vae(built["csv"], out, smoke_inputs["sd15"], shard_rows=SHARD, part=(2, 3))  # shards 2 and 3
    # A shard file lost after its shard was recorded: its rows (8-15, all valid) read as NaN.
    shard_file(folder, "std", 1).unlink()
    with pytest.raises(CacheBuildError, match=r"8 rows \(8, 9, 10, 11, 12, 13, 14, 15\) do not hold"):
        seal_cache(out)
    assert finished_shards(folder) == {0, 2, 3} and not out.exists()
    encoded = counting_vae_loader(monkeypatch)
    build_vae(built["csv"], out, smoke_inputs["sd15"], shard_rows=SHARD, part=(1, 3))
    assert sum(encoded) == SHARD
    monkeypatch.undo()
    seal_cache(out)
    assert_same_cache(out, built["vae"])


def test_shard_rows_must_hold_whole_batches_and_the_part_must_exist(built, smoke_inputs, tmp_path):
    with pytest.raises(ValueError, match=r"cache.shard_rows \(6\) must be a positive multiple of "
                                         r"cache.batch_size \(4\)"):
        build_vae(built["csv"], tmp_path / "a.zarr", smoke_inputs["sd15"], shard_rows=6)
    with pytest.raises(ValueError, match="part 3 does not exist: parts are numbered 0 to 2"):
        build_vae(built["csv"], tmp_path / "a.zarr", smoke_inputs["sd15"], shard_rows=SHARD, part=(3, 3))
    assert list(tmp_path.iterdir()) == []


# -- resume --------------------------------------------------------------------------------------------


def counting_vae_loader(monkeypatch, fail_after: int | None = None) -> list[int]:
    """Make build_vae_cache's VAE record the number of images of every encode call (and fail after
    `fail_after` calls, as a crash would)."""
    encoded: list[int] = []

    def load(*args, **kwargs):
        vae = LOAD_VAE(*args, **kwargs)
        encode = vae.encode

        def counted(images, *a, **k):
            if fail_after is not None and len(encoded) >= fail_after:
                raise RuntimeError("simulated crash")
            encoded.append(len(images))
            return encode(images, *a, **k)

        vae.encode = counted
        return vae

    monkeypatch.setattr(vae_module, "load_autoencoder", load)
    return encoded


def assert_same_cache(a: Path, b: Path, names=("mean", "std", "valid")) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in names:
        np.testing.assert_array_equal(bits(ga[name][:]), bits(gb[name][:]), err_msg=name)
    assert dict(ga.attrs) == dict(gb.attrs)


def test_resume_after_kill_encodes_only_the_unfinished_shards(built, smoke_inputs, tmp_path, monkeypatch, caplog):
    # Enough shards that the build is still running when the first ones are recorded as finished.
    table = pd.concat([built["table"]] * 2, ignore_index=True)
    table["id"] = [f"{i}_{n}" for n, i in enumerate(table["id"])]
    csv = tmp_path / "subset.csv"
    table.to_csv(csv, index=False)
    out = tmp_path / "vae_latents.zarr"
    folder = build_folder(out)
    shard_rows = 4  # two batches of 2 per shard: 15 shards
    num_shards = len(table) // shard_rows
    threads = torch.get_num_threads()  # the same arithmetic in both processes: bit-identical results
    script = (f"import torch; torch.set_num_threads({threads}); from urepa.caches import build_vae_cache; "
              f"build_vae_cache({str(csv)!r}, {str(out)!r}, {str(smoke_inputs['sd15'] / 'vae')!r}, {SMOKE_IMAGE_SIZE}, 2, 0, "
              f"torch.device('cpu'), shard_rows={shard_rows})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(tmp_path / "build.log", "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-c", script], stdout=log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        try:
            while process.poll() is None and time.monotonic() < deadline:
                if (folder / FINISHED).is_dir() and finished_shards(folder):
                    break
                time.sleep(0.01)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    finished = finished_shards(folder)
    assert finished, f"the build never finished a shard:\n{(tmp_path / 'build.log').read_text()[-2000:]}"
    assert process.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not out.exists() and len(finished) < num_shards
    with pytest.raises(FileNotFoundError, match="unfinished build"):
        open_cache(out)
    # What a kill in the middle of writing a shard leaves: a torn file that zarr cannot read.
    torn = min(set(range(num_shards)) - finished)
    shard_file(folder, "mean", torn).parent.mkdir(parents=True, exist_ok=True)
    shard_file(folder, "mean", torn).write_bytes(np.random.default_rng(0).bytes(1000))
    done_before = shard_rows * len(finished)

    encoded = counting_vae_loader(monkeypatch)
    with caplog.at_level(logging.INFO, logger="urepa.rowstore"):
        build_vae(csv, out, smoke_inputs["sd15"], batch_size=2, shard_rows=shard_rows)
    assert sum(encoded) == len(table) - done_before
    assert f"resuming, {done_before} of {len(table)} rows already done" in caplog.text
    assert out.exists() and not folder.exists()

    monkeypatch.undo()
    reference = build_vae(csv, tmp_path / "reference.zarr", smoke_inputs["sd15"], batch_size=2)  # one shard, no kill
    assert_same_cache(out, reference)


def test_partial_from_another_csv_is_discarded(built, smoke_inputs, tmp_path, monkeypatch, caplog):
    out = tmp_path / "vae_latents.zarr"
    partial = build_folder(out)
    counting_vae_loader(monkeypatch, fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_vae(built["csv"], out, smoke_inputs["sd15"], shard_rows=BATCH)
    assert finished_shards(partial) == {0, 1}

    other_csv = tmp_path / "reversed.csv"
    built["table"].iloc[::-1].to_csv(other_csv, index=False)
    encoded = counting_vae_loader(monkeypatch)
    with caplog.at_level(logging.INFO):
        build_vae(other_csv, out, smoke_inputs["sd15"], shard_rows=BATCH)
    assert "was started from other inputs" in caplog.text and len(list(tmp_path.glob("*.partial.stale-*"))) == 1
    assert "resuming" not in caplog.text
    assert sum(encoded) == len(built["table"])
    group = open_cache(out)
    assert group.attrs["csv_sha256"] == file_digest(other_csv)
    main = as_float(open_cache(built["vae"])["mean"][:])
    np.testing.assert_allclose(as_float(group["mean"][:]), main[::-1], rtol=1e-2, atol=2e-3)


def test_partial_of_another_shard_size_is_set_aside(built, smoke_inputs, tmp_path, caplog):
    out = tmp_path / "vae_latents.zarr"
    build_vae(built["csv"], out, smoke_inputs["sd15"], shard_rows=SHARD, part=(0, 4))
    with caplog.at_level(logging.INFO):
        build_vae(built["csv"], out, smoke_inputs["sd15"])
    assert f"laid out in shards of [{SHARD}] rows, not {rowstore.SHARD_ROWS}" in caplog.text
    assert len(list(tmp_path.glob("*.partial.stale-*"))) == 1
    assert_same_cache(out, built["vae"])


def test_partial_from_the_same_csv_is_resumed(built, smoke_inputs, tmp_path, monkeypatch):
    """An in-process crash (an exception, not a kill) leaves a partial that the next build finishes: shards
    recorded as finished are kept, the rows of the unfinished one are encoded again."""
    from urepa import dinov2  # build_dino_cache imports its loader from here when called

    out = tmp_path / "dino_tokens.zarr"
    calls: list[int] = []
    crash = [True]
    real_load = dinov2.load_dinov2

    def load(*args, **kwargs):
        encoder = real_load(*args, **kwargs)
        forward = encoder.forward

        def counted(images):
            if len(calls) == 3 and crash[0]:
                raise KeyboardInterrupt
            calls.append(len(images))
            return forward(images)

        encoder.forward = counted
        return encoder

    monkeypatch.setattr(dinov2, "load_dinov2", load)
    with pytest.raises(KeyboardInterrupt):
        build_dino(built["csv"], out, smoke_inputs["dinov2"], shard_rows=SHARD)
    assert sum(calls) == 3 * BATCH and finished_shards(build_folder(out)) == {0}  # shard 1 had one batch of two
    crash[0] = False
    build_dino(built["csv"], out, smoke_inputs["dinov2"], shard_rows=SHARD)
    assert sum(calls) == len(built["table"]) + BATCH
    np.testing.assert_array_equal(bits(open_cache(out)["tokens"][:]), bits(open_cache(built["dino"])["tokens"][:]))


# -- training reads ------------------------------------------------------------------------------------


def test_cached_rows_returns_the_requested_order(built):
    table = built["table"]
    dataset = CachedRows(built["vae"], built["dino"], table["class_id"].to_numpy())
    assert len(dataset) == len(table)
    vae, dino = open_cache(built["vae"]), open_cache(built["dino"])
    rows = np.array([17, 3, 29, 0, 11, 12])
    batch = dataset[rows]
    assert set(batch) == {"latent_mean", "latent_std", "tokens", "class_id", "row"}
    expected = {"latent_mean": vae["mean"][:][rows], "latent_std": vae["std"][:][rows],
                "tokens": dino["tokens"][:][rows]}
    for name, values in expected.items():
        assert batch[name].dtype == torch.float16
        np.testing.assert_array_equal(bits(batch[name].numpy()), bits(values), err_msg=name)
    assert batch["class_id"].dtype == torch.int64 and batch["row"].dtype == torch.int64
    for name, array in dataset._arrays.items():  # read in Rust, not through zarr-python's fallback pipeline
        pipeline = array.async_array.codec_pipeline
        assert type(pipeline).__name__ == "ZarrsCodecPipeline" and pipeline.impl is not None, name
    np.testing.assert_array_equal(batch["class_id"].numpy(), table["class_id"].to_numpy()[rows])
    np.testing.assert_array_equal(batch["row"].numpy(), rows)


def test_cached_rows_in_a_dataloader_worker(built):
    """As training reads: a sampler yields row batches, a worker process reads each whole batch."""
    table = built["table"]
    dataset = CachedRows(built["vae"], built["dino"], table["class_id"].to_numpy())
    sampler = StepBatches(np.arange(len(table)), batch_size=8, seed=0)
    loader = DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=1)
    tokens = open_cache(built["dino"])["tokens"][:]
    for batch, expected_rows in itertools.islice(zip(loader, sampler), 3):
        assert batch["tokens"].shape == (8, 16, tokens.shape[-1])
        np.testing.assert_array_equal(batch["row"].numpy(), expected_rows)
        np.testing.assert_array_equal(bits(batch["tokens"].numpy()), bits(tokens[expected_rows]))


# -- corrupted bytes in a sealed cache ------------------------------------------------------------------------------


def corrupt_row(cache: Path, array: str, shard: int, row_in_shard: int, count: int = 64) -> Path:
    """XOR `count` bytes in the middle of one row's chunk of a shard file (row chunks lie in row order, each its
    bytes and a 4-byte CRC, the shard index last): the values stay finite fp16, but not the ones written."""
    meta = zarr.open_array(str(cache / array), mode="r")
    row_bytes = int(np.prod(meta.shape[1:])) * meta.dtype.itemsize
    path = rowstore.shard_file(cache, array, shard)
    data = bytearray(path.read_bytes())
    middle = row_in_shard * (row_bytes + 4) + row_bytes // 2 - count // 2
    data[middle:middle + count] = bytes(b ^ 0x01 for b in data[middle:middle + count])  # lowest mantissa bits
    path.write_bytes(bytes(data))
    return path


@pytest.fixture()
def corrupted_dino(three_part_builds, tmp_path) -> tuple[Path, Path, Path]:
    """Copies of the three-part VAE and DINOv2 caches (shards of 8 rows), row 13 (shard 1) of the tokens flipped."""
    vae, dino = (shutil.copytree(three_part_builds[name], tmp_path / three_part_builds[name].name)
                 for name in ("vae", "dino"))
    return Path(vae), Path(dino), corrupt_row(Path(dino), "tokens", 1, 13 - SHARD)


def test_a_corrupted_row_is_never_read_into_a_batch(corrupted_dino):
    vae, dino, shard_path = corrupted_dino
    rows = CachedRows(vae, dino, np.arange(30) % 3)
    assert np.isfinite(rows[np.array([12, 14, 2])]["tokens"].numpy()).all()  # its neighbours read as they were
    with pytest.raises(rowstore.CacheCorruptError) as error:
        rows[np.array([3, 13, 20])]
    message = str(error.value)
    assert f"cache {dino}, array tokens: rows 13 do not match their checksums" in message
    assert str(shard_path) in message and "--forcerun cache_dino" in message


def test_verifying_a_cache_reads_it_whole_and_names_the_corrupt_rows(corrupted_dino, three_part_builds):
    vae, dino, shard_path = corrupted_dino
    rowstore.verify_cache(three_part_builds["dino"])  # intact: no error
    check_cache(vae, {}, verify=True)
    with pytest.raises(rowstore.CacheCorruptError, match=rf"rows 13 of shard 1 \({shard_path}\) fail their "
                                                         rf"checksums; array tokens's SHA-256 is"):
        check_cache(dino, {}, verify=True)
    # A torn shard index: the whole shard is named.
    data = bytearray(shard_path.read_bytes())
    data[-10:] = bytes(10)
    shard_path.write_bytes(bytes(data))
    with pytest.raises(rowstore.CacheCorruptError, match=r"rows 8, 9, 10, .* of shard 1 "):
        rowstore.verify_cache(dino)


def test_a_corrupted_clip_cache_stops_training_before_it_starts(built, tmp_path):
    clip = Path(shutil.copytree(built["clip"], tmp_path / "clip_embeddings.zarr"))
    check_cache(clip, {}, verify=True)
    path = next(p for p in (clip / "embeddings").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(rowstore.CacheCorruptError, match=r"embeddings's SHA-256 .*--forcerun cache_clip"):
        check_cache(clip, {}, verify=True)
