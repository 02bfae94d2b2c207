"""Class names: the curated ImageNet-1k table, the mapping-file fallback, and prompts that never repeat."""
import collections
from importlib.resources import files

import pytest

from urepa import generated
from urepa.subset import imagenet_class_names, list_classes, prompt_for

TABLE = files("urepa").joinpath("data", "imagenet_classes.tsv")
# First synonyms of LOC_synset_mapping.txt that repeat after lower-casing.
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
