"""Identities of inputs and outputs (urepa.digests): what each digest covers, and what it leaves out."""
import hashlib

import numpy as np
import zarr

from urepa.digests import content_digest, directory_digest, file_digest, weights_fingerprint


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "subset.csv"
    path.write_bytes(b"id,img_path\n0,a.JPEG\n")
    assert file_digest(path) == hashlib.sha256(b"id,img_path\n0,a.JPEG\n").hexdigest()
    assert file_digest(str(path)) == file_digest(path)


def test_directory_digest_covers_every_files_name_and_contents(tmp_path):
    folder = tmp_path / "weights"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "model.bin").write_bytes(b"\0" * 100 + b"tensor" + b"\0" * 100)
    (folder / "scheduler.json").write_text("{}")
    digest = directory_digest(folder)
    assert digest == directory_digest(folder) and len(digest) == 64
    (folder / "unet" / "model.bin").write_bytes(b"\0" * 100 + b"tensoR" + b"\0" * 100)  # a byte in the middle
    assert directory_digest(folder) != digest
    (folder / "unet" / "model.bin").write_bytes(b"\0" * 100 + b"tensor" + b"\0" * 100)
    assert directory_digest(folder) == digest
    (folder / "scheduler.json").rename(folder / "other.json")  # same bytes, another name
    assert directory_digest(folder) != digest


def test_weights_fingerprint_reads_configs_whole_and_weights_at_their_ends(tmp_path):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text('{"latent_channels": 4}')
    weights = bytearray(np.random.default_rng(0).bytes(3 << 20))  # 3 MiB: a middle MiB the fingerprint skips
    (folder / "model.safetensors").write_bytes(bytes(weights))
    fingerprint = weights_fingerprint(folder)
    assert len(fingerprint) == 16 and weights_fingerprint(str(folder)) == fingerprint
    weights[(3 << 20) // 2] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(weights))
    assert weights_fingerprint(folder) == fingerprint  # the middle is not read
    weights[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(weights))
    assert weights_fingerprint(folder) != fingerprint
    weights[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(weights))
    (folder / "config.json").write_text('{"latent_channels": 8}')
    assert weights_fingerprint(folder) != fingerprint
    # A checkpoint file on its own is fingerprinted by its name, size and ends.
    single = tmp_path / "dinov2_vitl14_pretrain.pth"
    single.write_bytes(b"weights")
    assert weights_fingerprint(single) != weights_fingerprint(tmp_path / "vae")
    assert len(weights_fingerprint(single)) == 16


def test_content_digest_is_of_the_metadata_and_the_valid_rows(tmp_path):
    def cache(path, valid, attrs):
        group = zarr.open_group(str(path), mode="w")
        group.create_array("valid", data=np.array(valid))
        group.attrs.update(attrs)
        return group

    attrs = {"csv_sha256": "abc", "errors": [], "num_invalid": 0}
    digest = content_digest(cache(tmp_path / "a.zarr", [True, True, True], attrs))
    assert len(digest) == 16
    # Key order does not matter; the same contents rebuilt elsewhere have the same identity.
    assert content_digest(cache(tmp_path / "b.zarr", [True, True, True], dict(reversed(attrs.items())))) == digest
    assert content_digest(cache(tmp_path / "c.zarr", [True, False, True], attrs)) != digest
    assert content_digest(cache(tmp_path / "d.zarr", [True, True, True], {**attrs, "num_invalid": 1})) != digest
    without_mask = zarr.open_group(str(tmp_path / "e.zarr"), mode="w")
    without_mask.attrs.update(attrs)
    assert len(content_digest(without_mask)) == 16 and content_digest(without_mask) != digest
