"""Stage 1: uniform, seeded, deterministic per-class samples; short classes kept and logged."""
import logging

import pytest

from urepa.subset import build_subset, list_classes


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
