"""Identities of inputs and outputs: SHA-256 of files and folders, cheap fingerprints of model weights, and the
content digest of a sealed cache. Run identities, cache checks and sample provenance are built from these."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import zarr


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's contents, read in 16 MiB blocks (checkpoints hold files of several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def directory_digest(path: str | Path) -> str:
    """SHA-256 over every file's relative name and full contents: the identity of exported weights. (A
    partial fine-tune changes tensors in the middle of a 3.4 GB file, which `weights_fingerprint` skips.)"""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def content_digest(group: zarr.Group) -> str:
    """Identity of a sealed cache's contents for a training run: its metadata (inputs, encoder, view, the
    invalid rows and why, the digest of every array's rows) and its valid-row mask. A cache rebuilt from
    damaged images differs here."""
    digest = hashlib.sha256(json.dumps(dict(group.attrs), sort_keys=True, default=str).encode())
    if "valid" in group:
        digest.update(np.asarray(group["valid"][:]).tobytes())
    return digest.hexdigest()[:16]


def weights_fingerprint(path: str | Path) -> str:
    """A cheap identity of a model folder or checkpoint file: configs in full, and every weight file's
    name, size and first and last MiB. Distinguishes checkpoints without hashing gigabytes."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as f:
            if file.suffix in {".json", ".txt"}:
                digest.update(f.read())
            else:
                digest.update(f.read(1 << 20))
                f.seek(max(0, size - (1 << 20)))
                digest.update(f.read())
    return digest.hexdigest()[:16]
