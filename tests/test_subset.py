"""Stage 1: uniform, seeded, deterministic per-class samples; short or empty classes stop the stage."""
import logging
import shutil

import pytest
import torch
import zarr

from urepa.caches import build_clip_cache
from urepa.subset import build_subset, choose_classes, list_classes


def test_classes_sorted_with_names_from_the_table(smoke_inputs):
    classes = list_classes(smoke_inputs["imagenet"])
    assert list(classes["synset"]) == sorted(classes["synset"])
    assert list(classes["class_id"]) == list(range(len(classes)))
    assert classes["name"][0] == "tench"


def test_subset_is_uniform_and_deterministic(smoke_inputs):
    a = build_subset(smoke_inputs["imagenet"], images_per_class=4, seed=7)
    b = build_subset(smoke_inputs["imagenet"], images_per_class=4, seed=7)
    c = build_subset(smoke_inputs["imagenet"], images_per_class=4, seed=8)
    assert list(a.columns) == ["id", "img_path", "class_id", "synset"]
    assert a.equals(b) and not a.equals(c)
    assert a["class_id"].value_counts().tolist() == [4, 4, 4]
    assert a["id"].is_unique
    assert all(synset in path for synset, path in zip(a["synset"], a["img_path"]))


def test_short_classes_stop_the_stage_naming_folder_and_count(smoke_inputs):
    with pytest.raises(ValueError, match=r"3 train classes have fewer than the 11 images.*/n\d+ holds 10"):
        build_subset(smoke_inputs["imagenet"], images_per_class=11, seed=0)
    with pytest.raises(ValueError, match="3 val classes have fewer than the 5 images.*holds 4"):
        build_subset(smoke_inputs["imagenet"], images_per_class=5, seed=0, split="val")


def test_an_empty_class_folder_is_an_error_not_a_class(smoke_inputs, tmp_path):
    """An empty synset folder would become a class that is sampled and scored but never trained on."""
    tree = tmp_path / "imagenet"
    shutil.copytree(smoke_inputs["imagenet"], tree)
    empty = tree / "Data" / "CLS-LOC" / "train" / "n99999999"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"1 train classes .*{empty} holds 0"):
        build_subset(tree, images_per_class=4, seed=0)


def test_files_of_other_extensions_are_counted_and_logged(smoke_inputs, tmp_path, caplog):
    tree = tmp_path / "imagenet"
    shutil.copytree(smoke_inputs["imagenet"], tree)
    first = sorted((tree / "Data" / "CLS-LOC" / "train").iterdir())[0]
    (first / "notes.txt").write_text("x")
    (first / "scan.tiff").write_bytes(b"x")
    (first / "scan2.TIFF").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        table = build_subset(tree, images_per_class=4, seed=0)
    assert len(table) == 12 and not table["img_path"].str.contains("notes|scan").any()
    assert "3 files that are not .jpeg/.jpg/.png images were left out (2 .tiff, 1 .txt)" in caplog.text


def test_val_subset_reads_labels_from_loc_val_solution(smoke_inputs):
    table = build_subset(smoke_inputs["imagenet"], images_per_class=2, seed=0, split="val")
    assert table["class_id"].value_counts().tolist() == [2, 2, 2]
    assert table["img_path"].str.contains("/val/").all()


def test_missing_tree_fails_with_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="Data/CLS-LOC/train"):
        build_subset(tmp_path, 3, 0)


def test_chosen_classes_are_seeded_sorted_reindexed_and_shared_by_val(smoke_inputs):
    picks = {}
    for seed in range(6):
        train = build_subset(smoke_inputs["imagenet"], images_per_class=3, seed=seed, num_classes=2)
        assert train.equals(build_subset(smoke_inputs["imagenet"], images_per_class=3, seed=seed, num_classes=2))
        classes = choose_classes(list_classes(smoke_inputs["imagenet"]), 2, seed)
        val = build_subset(smoke_inputs["imagenet"], images_per_class=2, seed=seed, split="val", num_classes=2)
        assert list(classes["class_id"]) == [0, 1] and list(classes["synset"]) == sorted(classes["synset"])
        for table in (train, val):
            assert table.groupby("class_id")["synset"].first().tolist() == list(classes["synset"])
        # A chosen class draws the same images as it does among all classes.
        everything = build_subset(smoke_inputs["imagenet"], images_per_class=3, seed=seed)
        kept = everything[everything["synset"].isin(classes["synset"])]
        assert kept["img_path"].tolist() == train["img_path"].tolist()
        picks[seed] = tuple(classes["synset"])
    assert len(set(picks.values())) > 1  # the choice depends on the seed


def test_too_many_classes_are_refused(smoke_inputs):
    with pytest.raises(ValueError, match="cannot choose 4 classes: the train folder holds 3"):
        build_subset(smoke_inputs["imagenet"], images_per_class=2, seed=0, num_classes=4)


def test_clip_cache_of_chosen_classes_has_one_row_per_class_and_the_null_prompt(smoke_inputs, tmp_path):
    classes_csv = tmp_path / "classes.csv"
    choose_classes(list_classes(smoke_inputs["imagenet"]), 2, seed=0).to_csv(classes_csv, index=False)
    cache = zarr.open_group(str(build_clip_cache(classes_csv, tmp_path / "clip.zarr", smoke_inputs["sd15"],
                                                 torch.device("cpu"))), mode="r")
    assert cache["embeddings"].shape[:2] == (3, 77)
    assert cache.attrs["null_index"] == 2 and cache.attrs["prompts"][-1] == ""
