"""Stage 1 (urepa.subset): uniform, seeded, deterministic per-class samples, short or empty classes stop the stage;
and the class names: the curated ImageNet-1k table, the mapping-file fallback, and prompts that never repeat."""
import collections
import logging
import shutil
from importlib.resources import files

import pytest

from urepa import generated
from urepa.subset import build_subset, choose_classes, imagenet_class_names, list_classes, prompt_for

TABLE = files("urepa").joinpath("data", "imagenet_classes.tsv")


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


# -- class names ------------------------------------------------------------------------------------------


MAPPING_COLLISIONS = [("n02012849", "n03126707"),   # crane: the bird, the machine
                      ("n03710637", "n03710721"),   # maillot: dancer's tights, swimsuit
                      ("n02113186", "n02963159")]   # Cardigan the corgi, cardigan the sweater


def test_table_lists_timm_imagenet_synsets_in_order():
    timm_synsets = files("timm").joinpath("data", "_info", "imagenet_synsets.txt").read_text().split()
    lines = TABLE.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "synset\tname"
    assert [line.split("\t")[0] for line in lines[1:]] == timm_synsets
    assert list(imagenet_class_names()) == timm_synsets
    assert len(timm_synsets) == 1000


def test_table_names_are_plain_single_line_ascii():
    for synset, name in imagenet_class_names().items():
        assert name and name == name.strip(), synset
        assert name.isascii() and name.isprintable(), synset   # isprintable() excludes tabs and newlines


def test_no_two_classes_share_a_prompt():
    prompts = collections.Counter(prompt_for(name).strip().lower() for name in imagenet_class_names().values())
    assert [p for p, n in prompts.items() if n > 1] == []


def test_mapping_file_collisions_are_resolved():
    names = imagenet_class_names()
    for pair in MAPPING_COLLISIONS:
        assert len({names[s].lower() for s in pair}) == 2, pair


def _tree_with_custom_synsets(root, mapping_lines: dict[str, str], unmapped: list[str] = ()):
    """The smoke tree's eight real classes plus synset folders outside ImageNet-1k, named (or not) in
    the mapping file."""
    root = generated.make_imagenet_tree(root, classes=len(generated.CLASSES), train_images=1,
                                        val_images=0)
    train_dir = root / "Data" / "CLS-LOC" / "train"
    for synset in [*mapping_lines, *unmapped]:
        (train_dir / synset).mkdir()
    with open(root / "LOC_synset_mapping.txt", "a") as f:
        f.writelines(f"{synset} {description}\n" for synset, description in mapping_lines.items())
    return root


def test_imagenet_classes_take_the_curated_names_over_the_mapping(tmp_path):
    root = generated.make_imagenet_tree(tmp_path, classes=len(generated.CLASSES), train_images=1,
                                        val_images=0)
    classes = list_classes(root)
    curated = imagenet_class_names()
    assert list(classes["name"]) == [curated[s] for s in classes["synset"]]
    # The mapping file's first synonym for n01514668 is "cock"; the table says what it shows.
    assert classes.set_index("synset")["name"]["n01514668"] == "rooster"


def test_custom_synsets_fall_back_to_the_mapping_then_to_their_id(tmp_path):
    root = _tree_with_custom_synsets(tmp_path, {"n99000001": "left-handed widget, sinistral widget"},
                                     unmapped=["n99000002"])
    classes = list_classes(root)
    names = classes.set_index("synset")["name"]
    assert names["n99000001"] == "left-handed widget"
    assert names["n99000002"] == "n99000002"
    assert names["n01440764"] == "tench"
    assert list(classes["synset"]) == sorted(classes["synset"])
    assert list(classes["class_id"]) == list(range(len(classes)))


def test_custom_synsets_sharing_a_prompt_fail_naming_both(tmp_path):
    root = _tree_with_custom_synsets(tmp_path, {"n99000001": "Widget, gadget", "n99000002": "widget"})
    with pytest.raises(ValueError, match="n99000001 and n99000002 share 'Widget'"):
        list_classes(root)


def test_a_custom_synset_may_not_take_a_curated_classes_name(tmp_path):
    root = _tree_with_custom_synsets(tmp_path, {"n99000001": "Tench"})
    with pytest.raises(ValueError, match="n01440764 and n99000001 share 'tench'"):
        list_classes(root)
