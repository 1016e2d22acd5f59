"""The torch Dataset over a HF split (seeded per-item augmentation, an optional cache of decoded images) and the
transforms the models see. The loaders that feed it are in mars_dist/data/loader.py."""

from __future__ import annotations

import io
import random
from typing import Callable

import datasets
import numpy as np
import torch
from PIL import Image

RGB_BYTES_PER_PIXEL = 4  # PIL keeps an RGB image as 32-bit pixels (RGBX)


class ToRGB:
    """Grey (L), palette or RGBA images -> 3-channel RGB: the pretrained models take 3 channels."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == "RGB" else img.convert("RGB")


def build_transforms(data_config: dict, train: bool, auto_augment: str | None = None, reprob: float = 0.0):
    """timm transforms for `data_config` (from models.resolve_data_config), after a grey->RGB conversion.

    train: light augmentation (random-resized-crop of 50-100% of the area, horizontal flip; no colour jitter),
    plus timm's `auto_augment` policy (e.g. 'rand-m9-mstd0.5-inc1') and random erasing with probability `reprob`
    (per-pixel noise) when set; eval: resize to size/crop_pct, centre crop. Randomness comes from torch's, Python's
    and NumPy's RNGs, seeded per item by ImageClassificationDataset.
    """
    from timm.data import create_transform
    from torchvision import transforms

    tf = create_transform(input_size=data_config["input_size"], is_training=train,
                          interpolation=data_config.get("interpolation", "bilinear"), mean=data_config["mean"],
                          std=data_config["std"], crop_pct=data_config.get("crop_pct"),
                          crop_mode=data_config.get("crop_mode"), scale=(0.5, 1.0), hflip=0.5, color_jitter=None,
                          **_augment_args(train, auto_augment, reprob))
    return transforms.Compose([ToRGB(), tf])


def _augment_args(train: bool, auto_augment: str | None, reprob: float) -> dict:
    """create_transform's augmentation arguments, only those that are on (the call is today's otherwise)."""
    if not train:
        return {}
    args = {"auto_augment": auto_augment} if auto_augment else {}
    if reprob:
        args.update(re_prob=reprob, re_mode="pixel", re_count=1)
    return args


class ImageClassificationDataset(torch.utils.data.Dataset):
    """A torch Dataset over a HF dataset split: item i is (transform(image), int label).

    With `seed` set, the random augmentation of item i in epoch e is drawn from its own seed (seed, e, i) instead
    of the global RNG streams. Data loaders fetch ahead of the training step, so with global RNG a checkpoint's
    saved RNG state would already include the next batch's draws and a resumed run would augment differently;
    per-item seeds make augmentation independent of when and where (which rank, which worker) an item is loaded.

    The index is `i` (augmented for the epoch of `set_epoch`) or a pair `(epoch, i)`. Loader workers hold their
    own copies of the dataset, and persistent ones keep them across epochs, so a `set_epoch` in the training
    process never reaches them; the loaders of mars_dist/data/loader.py therefore send the epoch with every index.
    """

    def __init__(self, hf_ds: datasets.Dataset, transform: Callable, seed: int | None = None):
        self.ds = hf_ds
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.decoded: list[Image.Image] | None = None  # cache_decoded(): the RGB images, before any transform
        self.labels: list[int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def cache_decoded(self) -> int:
        """Decode every image once (Arrow -> PIL -> RGB) and keep it; returns the bytes the pixels take. Batches
        are the same as without the cache: the transforms start from the same RGB image. Call it before the
        loader's workers start (they fork and share the decoded pixels)."""
        to_rgb = ToRGB()
        images, labels = [], []
        for row in self.ds:
            img = to_rgb(row["image"])
            img.load()
            images.append(img)
            labels.append(int(row["label"]))
        self.decoded, self.labels = images, labels
        return sum(im.width * im.height for im in images) * RGB_BYTES_PER_PIXEL

    def _row(self, i: int) -> tuple[Image.Image, int]:
        if self.decoded is not None:
            return self.decoded[i], self.labels[i]
        row = self.ds[i]
        return row["image"], int(row["label"])

    def __getitem__(self, index):
        epoch, i = index if isinstance(index, tuple) else (self.epoch, index)
        image, label = self._row(int(i))
        if self.seed is None:
            return self.transform(image), label
        item_seed = (self.seed * 1_000_003 + int(epoch)) * 10_000_019 + int(i)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (what the transforms draw from): torch.manual_seed also queues a seed for every
            # CUDA device and records the caller's stack for it, which cost more than the transforms at 64 px
            torch.default_generator.manual_seed(item_seed)
            random.seed(item_seed)  # timm's RandomResizedCropAndInterpolation draws from `random`
            np.random.seed(item_seed % 2**32)  # RandAugment picks its operations with NumPy
            try:
                x = self.transform(image)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return x, label


def estimate_decoded_bytes(hf_ds: datasets.Dataset, sample: int = 32) -> int:
    """The memory `cache_decoded` would take, from the headers of up to `sample` images spread over the split
    (PIL reads the size without decoding the pixels): their mean RGB size times the image count."""
    n = len(hf_ds)
    if n == 0:
        return 0
    raw = hf_ds.cast_column("image", datasets.Image(decode=False))
    picks = np.unique(np.linspace(0, n - 1, min(sample, n)).astype(int))
    pixels = 0
    for i in picks:
        rec = raw[int(i)]["image"]
        with Image.open(io.BytesIO(rec["bytes"]) if rec.get("bytes") else rec["path"]) as im:
            pixels += im.width * im.height
    return int(pixels / len(picks) * n) * RGB_BYTES_PER_PIXEL
