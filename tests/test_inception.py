"""The rehearsal tier's random Inception (urepa.inception, made by urepa.generated): the TF graph's blocks and
sizes, so that it goes through the real `inception_dir` path at the real shapes."""
import torch

from urepa.feature_networks import INCEPTION_FILENAME, INCEPTION_LAYERS


def test_random_inception_has_the_tf_graphs_blocks_and_sizes(inception_dir):
    base = torch.jit.load(str(inception_dir / INCEPTION_FILENAME))
    expected = {"conv": (32, 149), "pool1": (192, 35), "mixed": (256, 35), "mixed_2": (288, 35),
                "mixed_3": (768, 17), "mixed_7": (768, 17), "mixed_8": (1280, 8), "mixed_10": (2048, 8),
                "pool2": (2048, 1)}
    x = torch.zeros(1, 3, 299, 299)
    names = []
    for name, layer in base.layers.named_children():
        x = layer(x)
        names.append(name)
        if name in expected:
            channels, side = expected[name]
            assert x.shape[1:] == (channels, side, side), name
    assert tuple(names) == INCEPTION_LAYERS
    assert base.output.weight.shape == (1008, 2048)
    assert base(torch.zeros(2, 3, 299, 299), return_features=True).shape == (2, 2048)
