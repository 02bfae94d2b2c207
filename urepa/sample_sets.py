"""Sample sets on disk, apart from drawing them (`urepa.sample`): how a set is split into shards, gathering the
shards, checking a set against its sampling.json, and its grid. No torch here: the gathering jobs and the
workflow's plan import this module alone."""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)


def class_of(index: int, images_per_class: int) -> int:
    return index // images_per_class


def shard_count(total: int | None, batch_size: int, shards: int) -> int:
    """How many shards a set of `total` images (None: not known yet) is split into: `shards`, or fewer when the
    set has fewer batches (a shard is whole batches)."""
    return shards if total is None else max(1, min(shards, math.ceil(total / batch_size)))


def shard_indices(total: int, batch_size: int, shards: int, shard: int) -> range:
    """The image indices of shard `shard` of `shards`: whole batches of the set's one batch grid (batch k holds
    images kB .. kB + B - 1), spread evenly. Every image is computed in the same batch whatever the shard count
    (or a resume), so its bytes do not depend on how the set was split. With more shards than batches some
    shards are empty."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: need 0 <= shard < shards")
    batches = math.ceil(total / batch_size)
    return range(batches * shard // shards * batch_size, min(total, batches * (shard + 1) // shards * batch_size))


def gather_samples(shard_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Join the shards of one sample set into out_dir (hard links: no copy on the same file system), after
    checking that they come from the same weights and settings and tile the set's indices exactly."""
    out_dir = Path(out_dir)
    manifests = {Path(d): json.loads((Path(d) / "sampling.json").read_text()) for d in shard_dirs}
    common = [{k: v for k, v in m.items() if k != "indices"} for m in manifests.values()]
    if any(c != common[0] for c in common):
        raise ValueError(f"the shards {', '.join(map(str, manifests))} were sampled from different weights or "
                         f"settings; rerun them")
    total = common[0]["num_classes"] * common[0]["images_per_class"]
    covered = 0
    for start, stop in sorted(m["indices"] for m in manifests.values()):
        if start != covered:
            raise ValueError(f"the shards leave images {covered}..{start - 1} out or overlap at {start} "
                             f"(a set of {total})")
        covered = stop
    if covered != total:
        raise ValueError(f"the shards cover images 0..{covered - 1} of a set of {total}")
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    for shard_dir, manifest in manifests.items():
        for i in range(*manifest["indices"]):
            name = f"{i:06d}.png"
            try:
                os.link(shard_dir / name, partial / name)
            except OSError:  # another file system
                shutil.copy2(shard_dir / name, partial / name)
    (partial / "sampling.json").write_text(json.dumps({**common[0], "shards": len(manifests)}, indent=2))
    sessions = [session for shard_dir in manifests if (shard_dir / "provenance.json").exists()
                for session in json.loads((shard_dir / "provenance.json").read_text())]
    (partial / "provenance.json").write_text(json.dumps(sessions, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    log.info("gathered %d images from %d shards into %s", total, len(manifests), out_dir)
    return out_dir


def sample_paths(samples_dir: str | Path) -> list[Path]:
    return sorted(Path(samples_dir).glob("[0-9]*.png"))


class SampleSetError(ValueError):
    """A sample set that is not the set its sampling.json describes: a missing, extra or unreadable image."""


def check_sample_set(samples_dir: str | Path) -> list[Path]:
    """The set's images in index order, after checking their names against its sampling.json: exactly
    000000.png .. of num_classes x images_per_class, no more, no fewer (reading them is `score_samples`' part)."""
    samples_dir = Path(samples_dir)
    manifest_path = samples_dir / "sampling.json"
    if not manifest_path.is_file():
        raise SampleSetError(f"{samples_dir} has no sampling.json: not a sample set written by this workflow")
    manifest = json.loads(manifest_path.read_text())
    expected = [f"{i:06d}.png" for i in range(manifest["num_classes"] * manifest["images_per_class"])]
    found = {path.name for path in samples_dir.glob("*.png")}
    missing, extra = [name for name in expected if name not in found], sorted(found - set(expected))
    if missing or extra:
        def listed(names):
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        problems = ([f"{len(missing)} missing ({listed(missing)})"] if missing else []) + \
                   ([f"{len(extra)} not of the set ({listed(extra)})"] if extra else [])
        raise SampleSetError(f"{samples_dir} should hold {len(expected)} images ({manifest['num_classes']} classes x "
                             f"{manifest['images_per_class']}, sampling.json): {'; '.join(problems)}")
    return [samples_dir / name for name in expected]


def sample_grid(samples_dir: str | Path, out_png: str | Path, images_per_class: int, class_names: list[str],
                per_class: int = 6, max_classes: int = 16, thumb: int = 128) -> None:
    """One row per class (first `per_class` samples), labelled, as one PNG."""
    from PIL import ImageDraw

    num_classes = min(max_classes, len(class_names))
    columns = min(per_class, images_per_class)
    label_width = 160
    grid = Image.new("RGB", (label_width + columns * thumb, num_classes * thumb), "white")
    draw = ImageDraw.Draw(grid)
    for c in range(num_classes):
        draw.text((6, c * thumb + thumb // 2 - 6), class_names[c][:24], fill="black")
        for j in range(columns):
            path = Path(samples_dir) / f"{c * images_per_class + j:06d}.png"
            with Image.open(path) as image:
                grid.paste(image.convert("RGB").resize((thumb, thumb), Image.BICUBIC),
                           (label_width + j * thumb, c * thumb))
    grid.save(out_png)
    log.info("sample grid of %d classes x %d written to %s", num_classes, columns, out_png)



# What makes two sample sets' image `index` start from the same noise and prompt: the seed of `initial_noise`, and
# the class of the index (`class_of`, from the set's layout).
SAME_NOISE_KEYS = ("seed", "num_classes", "images_per_class")


def comparison_cells(sample_dirs: dict[str, str | Path], rows: int) -> list[tuple[int, int]]:
    """(class, image index) of each row of the comparison grid of final sample sets `sample_dirs` (column label:
    folder): `rows` classes spread evenly over the tier's classes (every class when it has fewer), each shown by
    its first image. Every column of a row holds image `index` of its set, drawn from the same initial noise and
    prompt; sets whose sampling.json differ in a `SAME_NOISE_KEYS` are refused, since their index would not be."""
    manifests = {label: json.loads((Path(folder) / "sampling.json").read_text())
                 for label, folder in sample_dirs.items()}
    differing = [key for key in SAME_NOISE_KEYS if len({m[key] for m in manifests.values()}) > 1]
    if differing:
        found = "; ".join(f"{label}: " + ", ".join(f"{key} {m[key]}" for key in differing)
                          for label, m in manifests.items())
        raise ValueError(f"the sample sets {', '.join(map(str, sample_dirs.values()))} differ in "
                         f"{', '.join(differing)} ({found}): a row's images would not share their initial noise "
                         f"and prompt")
    first = next(iter(manifests.values()))
    num_classes, per_class = first["num_classes"], first["images_per_class"]
    count = min(rows, num_classes)
    classes = [round(i * (num_classes - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]
    return [(c, c * per_class) for c in classes]


def comparison_grid(sample_dirs: dict[str, str | Path], out_png: str | Path, class_names: list[str], rows: int,
                    thumb: int = 128) -> list[tuple[int, int]]:
    """One PNG: a row per class of `comparison_cells`, labelled with its name, a column per sample set (labelled
    with its key), each cell that set's image of the row's index. Draws no image: reads the sets. Returns the
    cells' (class, index)."""
    from PIL import ImageDraw

    cells = comparison_cells(sample_dirs, rows)
    label_width, header = 160, 24
    grid = Image.new("RGB", (label_width + len(sample_dirs) * thumb, header + len(cells) * thumb), "white")
    draw = ImageDraw.Draw(grid)
    for column, label in enumerate(sample_dirs):
        draw.text((label_width + column * thumb + 4, 6), label[:20], fill="black")
    for row, (class_id, index) in enumerate(cells):
        top = header + row * thumb
        draw.text((6, top + thumb // 2 - 6), class_names[class_id][:24], fill="black")
        for column, folder in enumerate(sample_dirs.values()):
            with Image.open(Path(folder) / f"{index:06d}.png") as image:
                grid.paste(image.convert("RGB").resize((thumb, thumb), Image.BICUBIC),
                           (label_width + column * thumb, top))
    grid.save(out_png)
    log.info("comparison grid of %d classes x %d sample sets (%s) written to %s", len(cells), len(sample_dirs),
             ", ".join(sample_dirs), out_png)
    return cells
