"""`mars-dist prepare NAME SOURCE_DIR OUT_DIR`: the paper's datasets, as downloaded, into image folders.

Output (what `datasets.load_dataset("imagefolder", data_dir=OUT_DIR)` and our loader read):
OUT_DIR/{train,val,test}/<class>/<image>. SOURCE_DIR holds the official files as downloaded (archives) or already
extracted. OUT_DIR appears only when complete: everything is written to OUT_DIR.tmp-XXXX and renamed at the end.
"""

from __future__ import annotations

import io
import os
import random
import re
import secrets
import shutil
import tarfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

SPLITS = ("train", "val", "test")
BANNER_PX = 20  # FGVC-Aircraft README: the bottom 20 rows of every image are a copyright banner


class PrepareError(ValueError):
    """A source file is missing, corrupt or inconsistent; the message names it."""


@dataclass
class PrepareReport:
    """What was written: images per split, images per split and class, number of classes, where."""

    name: str
    out_dir: Path
    num_classes: int
    counts: dict[str, int]
    class_counts: dict[str, dict[str, int]]

    def __str__(self) -> str:
        per = ", ".join(f"{n} {s}" for s, n in self.counts.items())
        return f"{self.name}: {self.num_classes} classes, {per} images -> {self.out_dir}"


@dataclass(frozen=True)
class _Item:
    split: str
    label: str  # class folder name, already made safe
    src: Path
    list_file: str  # where the item was named, for error messages
    owned: bool = False  # src lies in our scratch extraction: move it instead of copying
    crop_bottom: int = 0


# ---------------------------------------------------------------- helpers shared by the preparers


def _extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive, refusing absolute or `..` member paths; a bad archive is an error naming it."""
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()  # reads the whole index: a truncated archive fails here
            for m in members:
                if m.name.startswith(("/", "\\")) or os.path.isabs(m.name) or ".." in Path(m.name).parts:
                    raise PrepareError(f"archive {archive} has an unsafe member path {m.name!r}; refusing it")
            safe = [m for m in members if m.isfile() or m.isdir()]  # no links or devices in the releases
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tf.extractall(dest, members=safe, **kw)
    except PrepareError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise PrepareError(f"archive {archive} is corrupt or truncated ({err}); download it again") from err


def _locate(src: Path, scratch: Path, *, marker: str, archive: str, prefixes: tuple[str, ...],
            expected: str) -> tuple[Path, bool]:
    """Root under which `marker` lies: an extracted copy in SOURCE_DIR, else `archive` extracted into scratch.

    Returns (root, owned) where owned says the root is our scratch copy.
    """
    for prefix in prefixes:
        if (src / prefix / marker).exists():
            return src / prefix, False
    arc = src / archive
    if not arc.is_file():
        where = f"{prefixes[0]}/{marker}" if prefixes[0] else marker
        raise PrepareError(f"{archive} not found in SOURCE_DIR {src} (nor an extracted {where}); "
                           f"expected files: {expected}")
    _extract(arc, scratch)
    for prefix in prefixes:
        if (scratch / prefix / marker).exists():
            return scratch / prefix, True
    raise PrepareError(f"archive {arc} does not contain {prefixes[0]}/{marker}; is it the right file?")


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise PrepareError(f"split list {path.name} not found (looked for {path})")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _need(img: Path, list_file: Path) -> Path:
    if not img.is_file():
        raise PrepareError(f"image {img.name} named in {list_file.name} is missing (looked for {img})")
    return img


def _safe_name(name: str) -> str:
    """Class name -> folder name: spaces, '/' and other path-hostile characters become '_' (F/A-18 -> F_A-18)."""
    return re.sub(r"[^\w.+-]+", "_", name.strip()).strip("._")


def _folder(name: str, seen: dict[str, str], where: Path | str) -> str:
    """Safe folder for a class name; two different names that would share a folder are an error."""
    safe = _safe_name(name)
    if not safe or seen.setdefault(safe, name) != name:
        raise PrepareError(f"class name {name!r} in {where} maps to folder {safe!r}, already used by "
                           f"{seen.get(safe)!r}")
    return safe


def _stratified_holdout(by_class: dict[str, list], fraction: float, seed: int) -> set:
    """Seeded per-class sample of `fraction` of each class (at least 1 and never all when fraction > 0)."""
    rng = random.Random(seed)
    held = set()
    for label in sorted(by_class):
        members = sorted(by_class[label])
        k = round(len(members) * fraction)
        if fraction > 0 and len(members) > 1:
            k = min(max(k, 1), len(members) - 1)
        held.update(rng.sample(members, k))
    return held


def _mat_vars(path: Path, names: tuple[str, ...]) -> dict:
    """Integer vectors `names` from a MATLAB file (1xN in the official release)."""
    import numpy as np
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises ValueError/TypeError/OSError variants for bad files
        raise PrepareError(f"{path.name} is not a readable .mat file ({err})") from err
    out = {}
    for name in names:
        if name not in mat:
            raise PrepareError(f"{path.name} has no variable {name!r} (has {sorted(k for k in mat if k[0] != '_')})")
        arr = np.asarray(mat[name]).ravel()
        if arr.size == 0 or not np.all(arr == np.round(arr)):
            raise PrepareError(f"{path.name}: variable {name!r} is not a vector of integers")
        out[name] = arr.astype(np.int64)
    return out


# ---------------------------------------------------------------- one preparer per dataset


def _flowers102(src: Path, scratch: Path, **_) -> list[_Item]:
    """Flowers-102: 102flowers.tgz (jpg/image_NNNNN.jpg), imagelabels.mat (labels), setid.mat (trnid/valid/tstid)."""
    expected = "102flowers.tgz (or its extracted jpg/), imagelabels.mat, setid.mat"
    for f in ("imagelabels.mat", "setid.mat"):
        if not (src / f).is_file():
            raise PrepareError(f"{f} not found in SOURCE_DIR {src}; expected files: {expected}")
    labels = _mat_vars(src / "imagelabels.mat", ("labels",))["labels"]
    ids = _mat_vars(src / "setid.mat", ("trnid", "valid", "tstid"))
    root, owned = _locate(src, scratch, marker="jpg", archive="102flowers.tgz", prefixes=("",), expected=expected)
    items = []
    for split, var in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        for i in ids[var]:
            if not 1 <= i <= len(labels):
                raise PrepareError(f"setid.mat: {var} names image {i}, but imagelabels.mat has {len(labels)} labels")
            img = _need(root / "jpg" / f"image_{i:05d}.jpg", src / "setid.mat")
            items.append(_Item(split, f"{labels[i - 1]:03d}", img, f"setid.mat:{var}", owned))
    return items


def _aircraft(src: Path, scratch: Path, *, crop_banner: bool = True, **_) -> list[_Item]:
    """FGVC-Aircraft 2013b, variant level: data/images_variant_{train,val,test}.txt lines 'ID VARIANT NAME'."""
    root, owned = _locate(src, scratch, marker="data/images", archive="fgvc-aircraft-2013b.tar.gz",
                          prefixes=("fgvc-aircraft-2013b", ""),
                          expected="fgvc-aircraft-2013b.tar.gz (or its extracted fgvc-aircraft-2013b/data/)")
    data = root / "data"
    known = set(_read_lines(data / "variants.txt")) if (data / "variants.txt").is_file() else None
    seen: dict[str, str] = {}
    items = []
    for split in SPLITS:
        lf = data / f"images_variant_{split}.txt"
        for line in _read_lines(lf):
            img_id, _, variant = line.partition(" ")
            variant = variant.strip()
            if not variant or (known is not None and variant not in known):
                raise PrepareError(f"{lf.name}: line {line!r} does not name a variant listed in variants.txt")
            img = _need(data / "images" / f"{img_id}.jpg", lf)
            items.append(_Item(split, _folder(variant, seen, lf.name), img, lf.name, owned,
                               BANNER_PX if crop_banner else 0))
    return items


def _dtd(src: Path, scratch: Path, *, split_id: int = 1, **_) -> list[_Item]:
    """DTD r1.0.1: labels/{train,val,test}<split_id>.txt lines 'class/class_NNNN.jpg' under images/."""
    if split_id not in range(1, 11):
        raise ValueError(f"DTD split_id must be 1..10, got {split_id}")
    root, owned = _locate(src, scratch, marker="images", archive="dtd-r1.0.1.tar.gz", prefixes=("dtd", ""),
                          expected="dtd-r1.0.1.tar.gz (or its extracted dtd/images/ and dtd/labels/)")
    items = []
    for split in SPLITS:
        lf = root / "labels" / f"{split}{split_id}.txt"
        for rel in _read_lines(lf):
            parts = rel.split("/")
            if len(parts) != 2 or ".." in parts:
                raise PrepareError(f"{lf.name}: line {rel!r} is not of the form class/file.jpg")
            items.append(_Item(split, _safe_name(parts[0]), _need(root / "images" / rel, lf), lf.name, owned))
    return items


def _pets(src: Path, scratch: Path, *, val_fraction: float = 0.1, seed: int = 0, **_) -> list[_Item]:
    """Oxford-IIIT Pets: annotations/{trainval,test}.txt; val is a seeded stratified part of trainval."""
    expected = "images.tar.gz and annotations.tar.gz (or their extracted images/ and annotations/)"
    ann_root, _ = _locate(src, scratch, marker="annotations", archive="annotations.tar.gz", prefixes=("",),
                          expected=expected)
    img_root, owned = _locate(src, scratch, marker="images", archive="images.tar.gz", prefixes=("",),
                              expected=expected)
    breed_of_id: dict[str, str] = {}

    def read(lf: Path) -> list[tuple[str, Path]]:
        out = []
        for line in _read_lines(lf):
            fields = line.split()
            if len(fields) < 2:
                raise PrepareError(f"{lf.name}: line {line!r} is not 'NAME CLASS-ID SPECIES BREED-ID'")
            breed = fields[0].rsplit("_", 1)[0]  # Breed_Name_123 -> Breed_Name (the class)
            if breed_of_id.setdefault(fields[1], breed) != breed:
                raise PrepareError(f"{lf.name}: class id {fields[1]} is both {breed_of_id[fields[1]]!r} and {breed!r}")
            out.append((breed, _need(img_root / "images" / f"{fields[0]}.jpg", lf)))
        return out

    trainval = read(ann_root / "annotations" / "trainval.txt")
    test = read(ann_root / "annotations" / "test.txt")
    by_class: dict[str, list[Path]] = {}
    for breed, img in trainval:
        by_class.setdefault(breed, []).append(img)
    held = _stratified_holdout(by_class, val_fraction, seed)
    items = [_Item("val" if img in held else "train", _safe_name(b), img, "trainval.txt", owned) for b, img in trainval]
    return items + [_Item("test", _safe_name(b), img, "test.txt", owned) for b, img in test]


DATASETS: dict[str, Callable[..., list[_Item]]] = {
    "flowers102": _flowers102, "aircraft": _aircraft, "dtd": _dtd, "pets": _pets}
_ALIASES = {"flowers": "flowers102", "flowers-102": "flowers102", "oxford-flowers": "flowers102",
            "oxford-flowers102": "flowers102", "fgvc-aircraft": "aircraft", "fgvc-aircraft-2013b": "aircraft",
            "describable-textures": "dtd", "pet": "pets", "oxford-pets": "pets", "oxford-iiit-pet": "pets",
            "oxford-iiit-pets": "pets"}


def resolve_name(name: str) -> str:
    """Registry name for `name` or an alias (case and '_'/'-' insensitive); unknown -> ValueError."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)} "
                         f"(aliases: {', '.join(sorted(_ALIASES))})")
    return key


# ---------------------------------------------------------------- writing


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise PrepareError(f"OUT_DIR {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise PrepareError(f"OUT_DIR {out} exists and is not empty; "
                               "pass overwrite=True (--overwrite) to replace it")


@contextmanager
def _atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh OUT_DIR.tmp-XXXX that replaces OUT_DIR on success and is removed on any error."""
    _refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()  # plain mkdir (not mkdtemp) so OUT_DIR gets the user's umask, not 0700
    try:
        yield tmp
        _refuse_existing(out, overwrite)  # again: it may have appeared while we were writing
        old = None
        if out.exists():
            old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _place(item: _Item, dst: Path, link: bool) -> None:
    if item.crop_bottom:
        from PIL import Image

        with Image.open(item.src) as im:
            w, h = im.size
            if h <= item.crop_bottom:
                raise PrepareError(f"image {item.src} ({w}x{h}) is too small to remove a {item.crop_bottom}px banner")
            im.crop((0, 0, w, h - item.crop_bottom)).save(dst, "JPEG", quality=95)
    elif item.owned:
        shutil.move(item.src, dst)  # our own scratch copy: moving is free and needs no extra space
    elif link:
        try:
            os.link(item.src, dst)  # a hard link survives the source being moved or deleted
        except OSError:
            os.symlink(item.src.resolve(), dst)  # other filesystem
    else:
        shutil.copy2(item.src, dst)


def _write_items(items: list[_Item], tmp: Path, link: bool) -> None:
    first_seen: dict[Path, str] = {}
    for it in items:  # all checks before the first byte is written
        if it.src in first_seen:
            raise PrepareError(f"image {it.src.name} is named twice ({first_seen[it.src]} and {it.list_file})")
        first_seen[it.src] = it.list_file
    for it in sorted(items, key=lambda i: (i.split, i.label, i.src.name)):
        dst = tmp / it.split / it.label / it.src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        _place(it, dst, link)


def _report(name: str, out: Path) -> PrepareReport:
    class_counts = {s: {c.name: sum(1 for _ in c.iterdir()) for c in sorted((out / s).iterdir())}
                    for s in SPLITS if (out / s).is_dir()}
    classes = {c for per in class_counts.values() for c in per}
    return PrepareReport(name, out, len(classes), {s: sum(class_counts.get(s, {}).values()) for s in SPLITS},
                         class_counts)


def prepare_dataset(name: str, source_dir: str | Path, out_dir: str | Path, *, val_fraction: float = 0.1,
                    seed: int = 0, link: bool = False, overwrite: bool = False, crop_banner: bool = True,
                    split_id: int = 1) -> PrepareReport:
    """Turn the official release of `name` in `source_dir` into out_dir/{train,val,test}/<class>/ folders.

    val_fraction/seed: the stratified val carved from trainval where the release has no val (Pets).
    link: hard-link (symlink across filesystems) instead of copying images from an extracted SOURCE_DIR.
    overwrite: replace a non-empty out_dir. crop_banner: drop Aircraft's 20px banner. split_id: DTD split 1..10.
    """
    key = resolve_name(name)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    src, out = Path(source_dir).expanduser(), Path(out_dir).expanduser()
    if not src.is_dir():
        raise PrepareError(f"SOURCE_DIR {src} is not a directory")
    with _atomic_output(out, overwrite) as tmp:
        scratch = tmp.with_name(tmp.name.replace(".tmp-", ".extract-"))  # same filesystem: moves are renames
        try:
            items = DATASETS[key](src, scratch, val_fraction=val_fraction, seed=seed, crop_banner=crop_banner,
                                  split_id=split_id)
            _write_items(items, tmp, link)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return _report(key, out)


# ---------------------------------------------------------------- the Hugging Face hub copies (online)

# Looked up on the hub (not downloadable here, so untested end to end); each gives image + class-label columns.
HUB_IDS = {
    "flowers102": "dpdl-benchmark/oxford_flowers102",  # train/validation/test = the official setid.mat split
    "aircraft": "HuggingFaceM4/FGVC-Aircraft",  # train/validation/test; label column may be 'variant'
    "dtd": "mcimpoi/dtd_split_1",  # train/validation/test of the official split 1
    "pets": "timm/oxford-iiit-pet",  # train (= trainval) / test; val is carved here
}
_HUB_SPLITS = {"train": "train", "trainval": "train", "validation": "val", "valid": "val", "val": "val",
               "dev": "val", "test": "test"}


def write_hf_dataset(dsdict, out_dir: str | Path, *, name: str = "hub", val_fraction: float = 0.1, seed: int = 0,
                     overwrite: bool = False, label_column: str | None = None,
                     image_column: str = "image") -> PrepareReport:
    """Write a `datasets.DatasetDict` (image + label columns) as out_dir/{train,val,test}/<class>/ folders.

    Images are written as stored (no re-encoding); without a validation split a seeded stratified
    val_fraction of train becomes val.
    """
    import datasets

    splits = {}
    for key, ds in dsdict.items():
        if key.lower() not in _HUB_SPLITS:
            raise PrepareError(f"hub split {key!r} is not one of {sorted(_HUB_SPLITS)}")
        splits[_HUB_SPLITS[key.lower()]] = ds
    if "train" not in splits:
        raise PrepareError(f"hub dataset has no train split (has {sorted(dsdict)})")
    feats = splits["train"].features
    col = label_column or next((c for c in ("label", "variant", "labels") if c in feats),
                               next((c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)), None))
    if col is None or col not in feats or image_column not in feats:
        raise PrepareError(f"hub dataset needs columns {image_column!r} and a label (has {sorted(feats)})")
    names = feats[col].names if isinstance(feats[col], datasets.ClassLabel) else None
    seen: dict[str, str] = {}
    folders = {i: _folder(n, seen, "the hub class names") for i, n in enumerate(names)} if names else {}
    held: set = set()
    if "val" not in splits and val_fraction > 0:
        by_class: dict = {}
        for i, y in enumerate(splits["train"][col]):
            by_class.setdefault(y, []).append(i)
        held = _stratified_holdout(by_class, val_fraction, seed)
    out = Path(out_dir).expanduser()
    with _atomic_output(out, overwrite) as tmp:
        for split, ds in splits.items():
            for i, row in enumerate(ds.cast_column(image_column, datasets.Image(decode=False))):
                target = "val" if split == "train" and i in held else split
                y = row[col]
                folder = folders.get(y, f"{y:03d}" if isinstance(y, int) else _safe_name(str(y)))
                _write_image_record(row[image_column], tmp / target / folder, f"{split}_{i:05d}")
    return _report(name, out)


def _write_image_record(rec: dict, folder: Path, stem: str) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    data = rec.get("bytes") or Path(rec["path"]).read_bytes()
    fmt = (Image.open(io.BytesIO(data)).format or "JPEG").upper()  # header only: picks the true extension
    ext = {"JPEG": ".jpg", "MPO": ".jpg"}.get(fmt, "." + fmt.lower())
    (folder / (stem + ext)).write_bytes(data)


def prepare_from_hub(name: str, out_dir: str | Path, *, val_fraction: float = 0.1, seed: int = 0,
                     overwrite: bool = False, hub_id: str | None = None,
                     label_column: str | None = None) -> PrepareReport:
    """Download the hub copy of `name` (HUB_IDS, or `hub_id`) and write the same layout as prepare_dataset.

    Needs network access to the hub: not exercised by the tests (write_hf_dataset, which does the writing, is).
    """
    from datasets import load_dataset

    key = resolve_name(name)
    return write_hf_dataset(load_dataset(hub_id or HUB_IDS[key]), out_dir, name=key, val_fraction=val_fraction,
                            seed=seed, overwrite=overwrite, label_column=label_column)
