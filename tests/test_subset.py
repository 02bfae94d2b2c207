"""Stage 1: uniform, seeded, deterministic per-class samples; short classes kept and logged."""
import logging

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


def test_short_classes_are_logged_and_kept(smoke_inputs, caplog):
    with caplog.at_level(logging.WARNING):
        table = build_subset(smoke_inputs["imagenet"], images_per_class=50, seed=0)
    assert table["class_id"].value_counts().tolist() == [10, 10, 10]
    assert "fewer than 50" in caplog.text


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
