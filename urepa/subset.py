"""Stage 1: a uniform, seeded per-class sample of an ILSVRC tree, written as a CSV.

Class id = index of the synset in sorted order of the train folder, so ids match the usual
ImageNet-1k label order. Names (prompts and report labels) come from the curated table shipped in
urepa/data/imagenet_classes.tsv; a synset it lacks takes LOC_synset_mapping.txt's first synonym,
else its id.
"""
from __future__ import annotations

import logging
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
SUBSET_COLUMNS = ["id", "img_path", "class_id", "synset"]


def prompt_for(class_name: str) -> str:
    return f"a photo of a {class_name}"


def prompt_key(class_name: str) -> str:
    """What CLIP's tokenizer reads of a class's prompt: it lower-cases and collapses whitespace, so
    names equal under this key give one embedding."""
    return " ".join(prompt_for(class_name).split()).lower()


@cache
def imagenet_class_names() -> dict[str, str]:
    """synset -> curated name for the 1000 ILSVRC-2012 classes (package data, so installed copies
    carry it). LOC_synset_mapping.txt's first synonyms repeat ("crane" is a bird and a machine)."""
    table = files("urepa").joinpath("data", "imagenet_classes.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in table.splitlines()[1:]]
    return {synset: name for synset, name in rows}


def _mapping_names(mapping: Path) -> dict[str, str]:
    """synset -> first synonym of LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca")."""
    names = {}
    for line in mapping.read_text().splitlines():
        synset, _, description = line.partition(" ")
        first = description.split(",")[0].strip()
        if first:
            names[synset] = first
    return names


def _check_distinct_prompts(synsets: list[str], names: list[str]) -> None:
    by_key: dict[str, list[tuple[str, str]]] = {}
    for synset, name in zip(synsets, names):
        by_key.setdefault(prompt_key(name), []).append((synset, name))
    shared = ["{} share {!r}".format(" and ".join(s for s, _ in group), group[0][1])
              for group in by_key.values() if len(group) > 1]
    if shared:
        raise ValueError("classes would be trained on one prompt (CLIP lower-cases it): " + "; ".join(shared)
                         + ". Give them distinct names in LOC_synset_mapping.txt.")


def list_classes(imagenet_dir: str | Path) -> pd.DataFrame:
    """class_id, synset, name for every synset folder under Data/CLS-LOC/train."""
    root = Path(imagenet_dir)
    train_dir = root / "Data" / "CLS-LOC" / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"no ILSVRC train folder at {train_dir} (expected Data/CLS-LOC/train/<synset>/*.JPEG)")
    synsets = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not synsets:
        raise FileNotFoundError(f"{train_dir} holds no class folders")
    curated = imagenet_class_names()
    uncurated = [s for s in synsets if s not in curated]
    mapped = {}
    if uncurated:
        mapping = root / "LOC_synset_mapping.txt"
        if mapping.is_file():
            mapped = _mapping_names(mapping)
        unnamed = [s for s in uncurated if s not in mapped]
        if unnamed:
            log.warning("%d synsets are neither ImageNet-1k classes nor named in %s: their names are their "
                        "ids (%s)", len(unnamed), mapping, ", ".join(unnamed[:5]))
    names = [curated.get(s) or mapped.get(s, s) for s in synsets]
    _check_distinct_prompts(synsets, names)
    return pd.DataFrame({"class_id": range(len(synsets)), "synset": synsets, "name": names})


def _images_in(folder: Path, others: dict[str, int] | None = None) -> list[Path]:
    """The image files of a folder; files of other extensions are counted into `others` (suffix -> count)."""
    images = []
    for path in folder.iterdir():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif others is not None and path.is_file():
            others[path.suffix.lower() or "(none)"] = others.get(path.suffix.lower() or "(none)", 0) + 1
    return sorted(images)


def _sample(paths: list[Path], k: int, rng: np.random.Generator) -> list[Path]:
    chosen = rng.permutation(len(paths))[:k]
    return [paths[i] for i in sorted(chosen)]


def _val_labels(root: Path, val_dir: Path) -> dict[str, list[Path]]:
    """Validation images per synset: synset sub-folders if the tree was reorganised, else the flat
    folder labelled by LOC_val_solution.csv (first synset of PredictionString)."""
    subfolders = [p for p in val_dir.iterdir() if p.is_dir()]
    if subfolders:
        return {p.name: _images_in(p) for p in subfolders}
    solution = root / "LOC_val_solution.csv"
    if not solution.is_file():
        raise FileNotFoundError(
            f"{val_dir} is flat and {solution} is missing: cannot tell validation images' classes")
    table = pd.read_csv(solution)
    by_synset: dict[str, list[Path]] = {}
    for image_id, prediction in zip(table["ImageId"], table["PredictionString"]):
        path = val_dir / f"{image_id}.JPEG"
        by_synset.setdefault(prediction.split()[0], []).append(path)
    return {s: sorted(p) for s, p in by_synset.items()}


def choose_classes(classes: pd.DataFrame, num_classes: int | None, seed: int) -> pd.DataFrame:
    """A seeded choice of `num_classes` of the classes (all of them when None), kept in synset order and
    re-indexed 0..N-1, so that class ids index the CLIP cache's N + 1 rows. The same seed and N give the
    same classes to the train subset, the validation subset and the class list."""
    if num_classes is None:
        return classes
    if not 1 <= num_classes <= len(classes):
        raise ValueError(f"cannot choose {num_classes} classes: the train folder holds {len(classes)}")
    chosen = np.sort(np.random.default_rng(seed).choice(len(classes), num_classes, replace=False))
    return classes.iloc[chosen].reset_index(drop=True).assign(class_id=range(num_classes))


def build_subset(imagenet_dir: str | Path, images_per_class: int, seed: int, split: str = "train",
                 num_classes: int | None = None) -> pd.DataFrame:
    """Sample `images_per_class` images of every class (of `num_classes` chosen ones, see
    `choose_classes`), reproducibly for a seed.

    A class with fewer images keeps all it has; each such class is logged.
    """
    root = Path(imagenet_dir)
    all_classes = list_classes(root)
    index_of = dict(zip(all_classes["synset"], all_classes["class_id"]))
    classes = choose_classes(all_classes, num_classes, seed)
    split_dir = root / "Data" / "CLS-LOC" / split
    others: dict[str, int] = {}
    if split == "train":
        per_synset = {s: _images_in(split_dir / s, others) for s in classes["synset"]}
    elif split == "val":
        if not split_dir.is_dir():
            raise FileNotFoundError(f"no ILSVRC validation folder at {split_dir}")
        per_synset = _val_labels(root, split_dir)
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if others:
        log.warning("%s: %d files that are not %s images were left out (%s)", split_dir, sum(others.values()),
                    "/".join(sorted(IMAGE_SUFFIXES)), ", ".join(f"{n} {suffix}" for suffix, n in sorted(others.items())))
    short = [f"{split_dir / synset if split == 'train' else synset} holds {len(per_synset.get(synset, []))}"
             for synset in classes["synset"] if len(per_synset.get(synset, [])) < images_per_class]
    if short:
        raise ValueError(f"{len(short)} {split} classes have fewer than the {images_per_class} images per class the "
                         f"tier asks for: " + "; ".join(short[:20]) + ("; ..." if len(short) > 20 else "")
                         + ". Complete or remove those folders, or lower the tier's images per class.")
    rows = []
    for class_id, synset in zip(classes["class_id"], classes["synset"]):
        paths = per_synset[synset]
        # One generator per synset, keyed by its index among all classes: adding, removing or choosing
        # classes leaves the others' samples unchanged.
        rng = np.random.default_rng([seed, int(index_of[synset])])
        for path in _sample(paths, images_per_class, rng):
            rows.append((path.stem, str(path.resolve()), int(class_id), synset))
    log.info("%s subset of %s: %d images, %d per class of %d classes (seed %d)", split, root, len(rows),
             images_per_class, len(classes), seed)
    return pd.DataFrame(rows, columns=SUBSET_COLUMNS)
