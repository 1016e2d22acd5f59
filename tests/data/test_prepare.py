"""`prepare_dataset` on small synthetic copies of the four official releases (real JPEGs, .mat files, tarballs)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mars_dist.data.prepare import DATASETS, PrepareError, prepare_dataset, resolve_name, write_hf_dataset


# ---------------------------------------------------------------- builders of the official structures


def _jpeg(path: Path, size=(24, 32), color=(90, 120, 60), banner=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    if banner:  # a white strip like Aircraft's copyright banner
        im.paste((255, 255, 255), (0, size[1] - banner, size[0], size[1]))
    im.save(path, "JPEG")


def _tar(archive: Path, stage: Path, *names: str) -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tf:
        for name in names:
            tf.add(stage / name, arcname=name)
    return archive


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _flowers_src(tmp: Path, archive: bool = True) -> Path:
    """12 images, 3 classes; ids 1-3 train, 4-6 val, 7-12 test; image i has class (i-1)%3+1."""
    src, stage = tmp / "flowers_src", tmp / "flowers_stage"
    for i in range(1, 13):
        _jpeg((stage if archive else src) / "jpg" / f"image_{i:05d}.jpg", color=(20 * i, 0, 0))
    if archive:
        _tar(src / "102flowers.tgz", stage, "jpg")
    scipy.io.savemat(src / "imagelabels.mat", {"labels": np.array([[(i - 1) % 3 + 1 for i in range(1, 13)]],
                                                                   dtype=np.uint8)})
    scipy.io.savemat(src / "setid.mat", {"trnid": np.array([[1, 2, 3]], dtype=np.uint16),
                                         "valid": np.array([[4.0, 5.0, 6.0]]),  # MATLAB doubles are fine too
                                         "tstid": np.arange(7, 13, dtype=np.uint16)[None, :]})
    return src


FLOWERS_TREE = ["test/001/image_00007.jpg", "test/001/image_00010.jpg", "test/002/image_00008.jpg",
                "test/002/image_00011.jpg", "test/003/image_00009.jpg", "test/003/image_00012.jpg",
                "train/001/image_00001.jpg", "train/002/image_00002.jpg", "train/003/image_00003.jpg",
                "val/001/image_00004.jpg", "val/002/image_00005.jpg", "val/003/image_00006.jpg"]

AIRCRAFT = {"train": [("0034309", "Boeing 707-320"), ("0034958", "Boeing 707-320"), ("0037511", "F/A-18"),
                      ("0041234", "A340-200")],
            "val": [("1025794", "Boeing 707-320"), ("1340192", "F/A-18"), ("1012345", "A340-200")],
            "test": [("1514522", "Boeing 707-320"), ("1201234", "F/A-18"), ("0062437", "A340-200")]}


def _aircraft_src(tmp: Path, archive: bool = True, tiny: str | None = None) -> Path:
    src, stage = tmp / "aircraft_src", tmp / "aircraft_stage"
    data = (stage if archive else src) / "fgvc-aircraft-2013b" / "data"
    for split, rows in AIRCRAFT.items():
        for img_id, _ in rows:
            _jpeg(data / "images" / f"{img_id}.jpg", size=(40, 10 if img_id == tiny else 60), color=(0, 0, 80),
                  banner=20 if img_id != tiny else 0)
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i} {v}\n" for i, v in rows))
    (data / "variants.txt").write_text("Boeing 707-320\nF/A-18\nA340-200\n")
    if archive:
        _tar(src / "fgvc-aircraft-2013b.tar.gz", stage, "fgvc-aircraft-2013b")
    return src


DTD_CLASSES = ("banded", "blotchy", "zigzagged")


def _dtd_src(tmp: Path, extra_test_line: str = "") -> Path:
    """3 classes x 6 images; split s: image k of a class is train if k%3==s%3, val if (k+1)%3==s%3, else test."""
    src, stage = tmp / "dtd_src", tmp / "dtd_stage"
    for c in DTD_CLASSES:
        for k in range(6):
            _jpeg(stage / "dtd" / "images" / c / f"{c}_{k:04d}.jpg", color=(0, 40 * k, 0))
    for s in (1, 2):
        lists = {"train": [], "val": [], "test": []}
        for c in DTD_CLASSES:
            for k in range(6):
                split = "train" if k % 3 == s % 3 else "val" if (k + 1) % 3 == s % 3 else "test"
                lists[split].append(f"{c}/{c}_{k:04d}.jpg")
        lists["test"] += [extra_test_line] if extra_test_line else []
        for split, lines in lists.items():
            p = stage / "dtd" / "labels" / f"{split}{s}.txt"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("\n".join(lines) + "\n")
    _tar(src / "dtd-r1.0.1.tar.gz", stage, "dtd")
    return src


PETS = {"Abyssinian": (1, 1), "Bengal": (6, 1), "american_bulldog": (2, 2), "great_pyrenees": (17, 2)}


def _pets_src(tmp: Path) -> Path:
    """4 breeds (two with underscores in their names) x (10 trainval + 2 test)."""
    src, stage = tmp / "pets_src", tmp / "pets_stage"
    trainval, test = [], []
    for breed, (cid, species) in PETS.items():
        for n in range(1, 13):
            _jpeg(stage / "images" / f"{breed}_{n}.jpg", color=(cid * 10, n * 10, 0))
            (trainval if n <= 10 else test).append(f"{breed}_{n} {cid} {species} {cid}\n")
    (stage / "annotations").mkdir()
    (stage / "annotations" / "trainval.txt").write_text("".join(trainval))
    (stage / "annotations" / "test.txt").write_text("".join(test))
    _tar(src / "images.tar.gz", stage, "images")
    _tar(src / "annotations.tar.gz", stage, "annotations")
    return src


def _load_imagefolder(out: Path, tmp: Path):
    import datasets

    return datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp / "hf_cache"))


# ---------------------------------------------------------------- the four datasets


def test_flowers102_from_archives(tmp_path):
    out = tmp_path / "data" / "flowers"
    report = prepare_dataset("Flowers-102", _flowers_src(tmp_path), out)
    assert _files(out) == FLOWERS_TREE
    assert report.counts == {"train": 3, "val": 3, "test": 6} and report.num_classes == 3
    assert report.class_counts["test"] == {"001": 2, "002": 2, "003": 2}
    assert os.listdir(out.parent) == ["flowers"]  # no tmp/extract leftovers
    ds = _load_imagefolder(out, tmp_path)
    assert {k: len(v) for k, v in ds.items()} == {"train": 3, "validation": 3, "test": 6}
    assert ds["train"].features["label"].names == ["001", "002", "003"]
    # class 002 of test holds images 8 and 11, painted red 160 and 220: labels and pixels travel together
    test = ds["test"]
    reds = sorted(np.asarray(r["image"])[..., 0].mean() for r in test
                  if test.features["label"].int2str(r["label"]) == "002")
    assert np.allclose(reds, [160, 220], atol=3)


def test_flowers102_extracted_dir_with_links(tmp_path):
    src = _flowers_src(tmp_path, archive=False)
    out = tmp_path / "flowers"
    prepare_dataset("flowers102", src, out, link=True)
    assert _files(out) == FLOWERS_TREE
    assert os.path.samefile(out / "train/002/image_00002.jpg", src / "jpg/image_00002.jpg")
    assert (src / "jpg/image_00002.jpg").is_file()  # the source is left in place


def test_aircraft_variants_and_banner_crop(tmp_path):
    out = tmp_path / "aircraft"
    report = prepare_dataset("fgvc_aircraft", _aircraft_src(tmp_path), out)
    folders = {"Boeing 707-320": "Boeing_707-320", "F/A-18": "F_A-18", "A340-200": "A340-200"}
    assert _files(out) == sorted(f"{s}/{folders[v]}/{i}.jpg" for s, rows in AIRCRAFT.items() for i, v in rows)
    assert report.counts == {"train": 4, "val": 3, "test": 3} and report.num_classes == 3
    with Image.open(out / "train/F_A-18/0037511.jpg") as im:
        assert im.size == (40, 40)  # 60 - 20
        assert np.asarray(im.convert("RGB"))[-3:].mean() < 120  # the white banner is gone
    ds = _load_imagefolder(out, tmp_path)
    assert ds["train"].features["label"].num_classes == 3 and len(ds["validation"]) == 3


def test_aircraft_keep_banner_from_extracted_dir(tmp_path):
    out = tmp_path / "aircraft"
    prepare_dataset("aircraft", _aircraft_src(tmp_path, archive=False), out, crop_banner=False)
    with Image.open(out / "test/A340-200/0062437.jpg") as im:
        assert im.size == (40, 60)


def test_dtd_split_ids(tmp_path):
    src = _dtd_src(tmp_path)
    report = prepare_dataset("DTD", src, tmp_path / "dtd1")
    expected = sorted(f"{split}/{c}/{c}_{k:04d}.jpg" for c in DTD_CLASSES for k in range(6)
                      for split in ["train" if k % 3 == 1 else "val" if (k + 1) % 3 == 1 else "test"])
    assert _files(tmp_path / "dtd1") == expected
    assert report.counts == {"train": 6, "val": 6, "test": 6} and report.num_classes == 3
    prepare_dataset("dtd", src, tmp_path / "dtd2", split_id=2)
    assert _files(tmp_path / "dtd2/train") == sorted(f"{c}/{c}_{k:04d}.jpg" for c in DTD_CLASSES for k in (2, 5))
    assert _load_imagefolder(tmp_path / "dtd2", tmp_path)["test"].features["label"].num_classes == 3
    with pytest.raises(ValueError, match="split_id must be 1..10"):
        prepare_dataset("dtd", src, tmp_path / "dtd11", split_id=11)


def test_pets_stratified_seeded_val(tmp_path):
    src = _pets_src(tmp_path)
    report = prepare_dataset("oxford-pets", src, tmp_path / "pets", val_fraction=0.2, seed=0)
    out = tmp_path / "pets"
    assert report.num_classes == 4 and report.counts == {"train": 32, "val": 8, "test": 8}
    for breed in PETS:
        train = {p.name for p in (out / "train" / breed).iterdir()}
        val = {p.name for p in (out / "val" / breed).iterdir()}
        assert len(train) == 8 and len(val) == 2 and not train & val
        assert train | val == {f"{breed}_{n}.jpg" for n in range(1, 11)}
        assert _files(out / "test" / breed) == [f"{breed}_11.jpg", f"{breed}_12.jpg"]
    prepare_dataset("pets", src, tmp_path / "again", val_fraction=0.2, seed=0)
    prepare_dataset("pets", src, tmp_path / "seed1", val_fraction=0.2, seed=1)
    assert _files(tmp_path / "again") == _files(out)  # same seed, same split
    assert _files(tmp_path / "seed1") != _files(out)
    ds = _load_imagefolder(out, tmp_path)
    assert ds["train"].features["label"].names == sorted(PETS) and len(ds["validation"]) == 8


def test_hub_writer_same_layout(tmp_path):
    import datasets

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat/x", "dog"])})
    imgs = [Image.new("RGB", (8, 8), (i * 20, 0, 0)) for i in range(10)]
    dsd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": imgs[:8], "label": [0, 1] * 4}, features=feats),
        "test": datasets.Dataset.from_dict({"image": imgs[8:], "label": [0, 1]}, features=feats)})
    report = write_hf_dataset(dsd, tmp_path / "hub", name="pets", val_fraction=0.25, seed=0)
    assert report.counts == {"train": 6, "val": 2, "test": 2}
    assert report.class_counts["val"] == {"cat_x": 1, "dog": 1}
    assert _load_imagefolder(tmp_path / "hub", tmp_path)["train"].features["label"].names == ["cat_x", "dog"]


# ---------------------------------------------------------------- errors


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(ValueError, match="flowers102, aircraft, dtd, pets"):
        resolve_name("cifar")
    assert set(DATASETS) == {"flowers102", "aircraft", "dtd", "pets"}


def test_missing_setid_mat(tmp_path):
    src = _flowers_src(tmp_path)
    (src / "setid.mat").unlink()
    with pytest.raises(PrepareError, match=r"setid\.mat not found in SOURCE_DIR .*expected files: 102flowers"):
        prepare_dataset("flowers102", src, tmp_path / "out" / "flowers")
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_archive_is_named(tmp_path, damage):
    src = _flowers_src(tmp_path)
    arc = src / "102flowers.tgz"
    data = arc.read_bytes()
    arc.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a tarball" * 100)
    with pytest.raises(PrepareError, match=r"archive .*102flowers\.tgz is corrupt or truncated"):
        prepare_dataset("flowers102", src, tmp_path / "out" / "flowers")
    assert os.listdir(tmp_path / "out") == []  # neither OUT_DIR nor its tmp/extract siblings


def test_unsafe_archive_member_refused(tmp_path):
    src = _flowers_src(tmp_path)
    (tmp_path / "evil.jpg").write_bytes(b"x")
    with tarfile.open(src / "102flowers.tgz", "w:gz") as tf:
        tf.add(tmp_path / "evil.jpg", arcname="../evil.jpg")
    (tmp_path / "evil.jpg").unlink()
    with pytest.raises(PrepareError, match="unsafe member path '../evil.jpg'"):
        prepare_dataset("flowers102", src, tmp_path / "out" / "flowers")
    assert not (tmp_path / "out" / "evil.jpg").exists() and not (tmp_path / "evil.jpg").exists()


def test_list_naming_missing_image(tmp_path):
    src = _dtd_src(tmp_path, extra_test_line="banded/banded_9999.jpg")
    with pytest.raises(PrepareError, match=r"image banded_9999\.jpg named in test1\.txt is missing"):
        prepare_dataset("dtd", src, tmp_path / "out" / "dtd")
    assert os.listdir(tmp_path / "out") == []


def test_failure_while_writing_leaves_no_out_dir(tmp_path):
    src = _aircraft_src(tmp_path, archive=False, tiny="1514522")  # a 10px-high test image: no banner to cut
    with pytest.raises(PrepareError, match=r"1514522\.jpg .* too small"):
        prepare_dataset("aircraft", src, tmp_path / "out" / "aircraft")
    assert os.listdir(tmp_path / "out") == []


def test_existing_out_dir_refused_unless_overwrite(tmp_path):
    src = _flowers_src(tmp_path, archive=False)
    out = tmp_path / "flowers"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PrepareError, match="exists and is not empty; pass overwrite=True"):
        prepare_dataset("flowers102", src, out)
    assert _files(out) == ["keep.txt"]
    prepare_dataset("flowers102", src, out, overwrite=True)
    assert _files(out) == FLOWERS_TREE
    assert sorted(os.listdir(tmp_path)) == ["flowers", "flowers_src"]
