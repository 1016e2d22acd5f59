"""The trainer's loaders (mars_dist/data/loader.py): the same batches, bit for bit, whatever the worker count, worker
persistence and decoded-image cache, across epochs and across a resume mid-epoch, through accelerate's prepared
loader as the trainer drives it (set_epoch on loader and dataset, skip_first_batches on resume)."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from accelerate.utils import set_seed

from mars_dist.config import ConfigError, DataConfig, load
from mars_dist.data.splits import _fashion_mnist_arrays, build_splits
from mars_dist.data.dataset import ImageClassificationDataset, build_transforms, estimate_decoded_bytes
from mars_dist.data.loader import auto_workers, build_loader, local_processes, maybe_cache, resolve_pin_memory
from mars_dist.sharding.accelerate_setup import make_accelerator

pytestmark = pytest.mark.skipif(_fashion_mnist_arrays(None) is None, reason="apt-get install dataset-fashion-mnist")

SEED, BATCH, EPOCHS = 0, 4, 3
RESUME = (1, 2)  # a resumed process starts in epoch 1 after its first 2 batches
TF_CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
          "crop_pct": 0.875, "crop_mode": "center"}


@pytest.fixture(scope="module")
def split():
    return build_splits("fashion-mnist", None, 2, 1, 0.1, 10, seed=SEED).train  # 20 images: 5 batches an epoch


@pytest.fixture(scope="module")
def accelerator_once():
    return make_accelerator(1, "no", None)  # the trainer's (seedable sampler)


@pytest.fixture
def accelerator(accelerator_once):
    yield accelerator_once
    accelerator_once.free_memory()  # it holds every prepared loader: let them and their persistent workers go
    gc.collect()


class _WithIndex(ImageClassificationDataset):
    """Items also carry their index, to check batches against the items computed one by one."""

    def __getitem__(self, index):
        return (*super().__getitem__(index), index[1] if isinstance(index, tuple) else index)


def _dataset(split, cache=False):
    ds = _WithIndex(split, build_transforms(TF_CFG, train=True), seed=SEED)
    if cache:
        ds.cache_decoded()
    return ds


def _settings(workers, persistent=False):
    return DataConfig(num_workers=workers, persistent_workers=persistent, cache_decoded=False, pin_memory=False)


def _prepared(accelerator, ds, settings, make=build_loader):
    set_seed(SEED)  # as the trainer, before prepare: the seedable sampler takes torch's initial seed
    return accelerator.prepare(make(ds, settings, BATCH, SEED, shuffle=True, drop_last=True, say=lambda _: None))


def _run(loader, ds, start=(0, 0), epochs=EPOCHS, skip=None):
    """The trainer's loop over the batches: {(epoch, batch number): batch}."""
    skip = skip or (lambda dl, n: skip_first_batches(dl, n))
    first_epoch, first_batch = start
    got = {}
    for epoch in range(first_epoch, epochs):
        loader.set_epoch(epoch)
        ds.set_epoch(epoch)
        b0 = first_batch if epoch == first_epoch else 0
        for b, batch in enumerate(skip(loader, b0) if b0 else loader, start=b0):
            got[(epoch, b)] = batch  # images, labels, indices
    return got


def _differing(a: dict, b: dict) -> list:
    """Keys of `b` whose batch is not bit-identical in `a`."""
    return [k for k in b if not all(torch.equal(u, v) for u, v in zip(a[k], b[k]))]


def _check_each_item_has_its_epochs_augmentation(got: dict, split) -> None:
    """Not only the same across settings but right: item i of epoch e as the dataset alone augments it then."""
    ds = _dataset(split)
    for (epoch, _), (x, _, index) in got.items():
        ds.set_epoch(epoch)
        assert torch.equal(x, torch.stack([ds[int(i)][0] for i in index])), f"epoch {epoch}"


@pytest.fixture(scope="module")
def reference(split, accelerator_once):
    ds = _dataset(split)
    got = _run(_prepared(accelerator_once, ds, _settings(0)), ds)
    assert len(got) == EPOCHS * 5
    _check_each_item_has_its_epochs_augmentation(got, split)
    # epochs differ (another order and another augmentation), so repeating epoch 0 could not go unseen
    assert not torch.equal(got[(0, 0)][0], got[(1, 0)][0])
    return got


@pytest.mark.parametrize("workers,persistent", [(1, False), (1, True), (2, False), (2, True)])
def test_batches_do_not_depend_on_workers_or_persistence(split, accelerator, reference, workers, persistent):
    ds = _dataset(split)
    assert _differing(_run(_prepared(accelerator, ds, _settings(workers, persistent)), ds), reference) == []
    # a resumed process: new dataset and loader, skip_first_batches into epoch 1, then whole epochs
    ds = _dataset(split)
    resumed = _run(_prepared(accelerator, ds, _settings(workers, persistent)), ds, start=RESUME,
                   skip=accelerator.skip_first_batches)
    assert sorted(resumed) == sorted(k for k in reference if k >= RESUME)
    assert _differing(reference, resumed) == []


def test_the_old_set_epoch_only_loader_repeats_epoch_0_with_persistent_workers(split, accelerator, reference):
    """What the epoch-carrying indices fix, shown by the same comparison: a plain shuffled DataLoader (the trainer's
    before) whose dataset learns the epoch only from set_epoch in the training process."""

    def plain(ds, settings, batch, seed, shuffle, drop_last, say):
        return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=shuffle, drop_last=drop_last,
                                           generator=torch.Generator().manual_seed(seed), num_workers=2,
                                           persistent_workers=settings.persistent_workers)

    for persistent in (False, True):
        ds = _dataset(split)
        got = _run(_prepared(accelerator, ds, _settings(2, persistent), make=plain), ds, epochs=2)
        bad = _differing(reference, got)
        if persistent:  # the workers' dataset copies stay at epoch 0: every batch of epoch 1 is augmented wrongly
            assert bad == [(1, b) for b in range(5)]
        else:  # new workers each epoch copy the updated epoch
            assert bad == []


def test_sharded_across_two_processes(split, accelerator):
    """Under 2 processes accelerate wraps the batch sampler (BatchSamplerShard) and sets the epoch on the sampler
    only: each rank's batches, with workers and persistent, match the rank's batches loaded in-process."""
    def shard(settings, rank, start=(0, 0)):
        ds = _dataset(split)
        set_seed(SEED)
        loader = build_loader(ds, settings, BATCH, SEED, shuffle=True, drop_last=True, say=lambda _: None)
        loader = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False,
                                     use_seedable_sampler=True)
        return _run(loader, ds, start=start)

    for rank in (0, 1):
        ref = shard(_settings(0), rank)
        assert len(ref) == EPOCHS * 2
        _check_each_item_has_its_epochs_augmentation(ref, split)
        assert _differing(ref, shard(_settings(2, persistent=True), rank)) == []
        assert _differing(ref, shard(_settings(2, persistent=True), rank, start=(1, 1))) == []


def test_decoded_cache_gives_the_same_batches(split, accelerator, reference):
    ds = _dataset(split, cache=True)
    assert ds.decoded is not None and all(im.mode == "RGB" for im in ds.decoded)
    assert _differing(_run(_prepared(accelerator, ds, _settings(2, persistent=True)), ds), reference) == []
    ds = _dataset(split, cache=True)
    resumed = _run(_prepared(accelerator, ds, _settings(0)), ds, start=RESUME, skip=accelerator.skip_first_batches)
    assert _differing(reference, resumed) == []


def test_items_are_augmented_as_before_the_pipeline_change(split):
    """Seeding only the CPU generator draws what torch.manual_seed did: runs resumed across the change match."""
    import random

    ds = _dataset(split)
    for epoch, i in ((0, 0), (1, 7), (5, 19)):
        seed = (SEED * 1_000_003 + epoch) * 10_000_019 + i
        torch.manual_seed(seed)
        random.seed(seed)
        assert torch.equal(ds[(epoch, i)][0], ds.transform(split[i]["image"]))


def test_auto_cache_follows_the_size_estimate_and_says_what_it_takes(split):
    said = []
    estimate = estimate_decoded_bytes(split)
    assert estimate == 20 * 28 * 28 * 4  # Fashion-MNIST: 28x28, held as RGB at 4 bytes a pixel
    small = dataclasses.replace(DataConfig(), cache_max_bytes=estimate)
    ds = _dataset(split)
    assert maybe_cache(ds, small, said.append) and ds.decoded is not None
    assert said == ["data: cached 20 decoded images in memory: 0.1 MiB per process"]
    ds = _dataset(split)
    assert not maybe_cache(ds, dataclasses.replace(small, cache_max_bytes=estimate - 1), said.append)
    assert ds.decoded is None and "above data.cache_max_bytes" in said[-1]
    assert not maybe_cache(ds, dataclasses.replace(small, cache_decoded=False), said.append)


def test_auto_workers_share_the_cores_and_leave_one(monkeypatch):
    assert auto_workers(cpus=2, processes=1) == 1  # this machine
    assert auto_workers(cpus=2, processes=2) == 0  # nothing left: load in the training process
    assert auto_workers(cpus=96, processes=8) == 11
    assert auto_workers(cpus=256, processes=1) == 16  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert local_processes() == 4
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_processes() == 16
    monkeypatch.delenv("WORLD_SIZE")
    assert local_processes() == 1
    assert resolve_pin_memory("auto", "cpu") is False and resolve_pin_memory("auto", "cuda:0") is True
    assert resolve_pin_memory(True, "cpu") is True


@pytest.mark.parametrize("override,message", [
    ("data.num_workers=-1", "'data.num_workers' = -1 must be 'auto' or an integer >= 0"),
    ("data.num_workers=lots", "'data.num_workers' = 'lots' must be 'auto'"),
    ("data.pin_memory=sometimes", "'data.pin_memory' = 'sometimes' must be 'auto', true or false"),
    ("data.cache_decoded=maybe", "'data.cache_decoded' = 'maybe'"),
    ("data.prefetch_factor=0", "'data.prefetch_factor' = 0 must be > 0"),
    ("data.persistent_workers=often", "'data.persistent_workers' must be true/false, got 'often'"),
])
def test_loader_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load(None, [override])
    cfg = load(None, ["data.num_workers=3", "data.pin_memory=true", "data.cache_decoded=false"]).data
    assert (cfg.num_workers, cfg.pin_memory, cfg.cache_decoded) == (3, True, False)
    assert load(None).data.num_workers == "auto"


@pytest.mark.slow
def test_trainer_with_workers_resumed_across_an_epoch_equals_an_in_process_run(tmp_path):
    """End to end: 8 updates of 5 a epoch, loaded in-process and uncached, against the same run with 2 persistent
    workers and the cache, stopped after update 6 (mid epoch 1) and resumed: bit-identical weights."""
    import shutil

    from safetensors.torch import load_file

    from mars_dist.run import checkpoint as ckpt
    from mars_dist.run.train import train

    def run(out, *overrides):
        return train(load(None, [
            f"output_dir={out}", "data.image_size=32", "data.train_per_class=4", "data.val_per_class=1",
            "data.test_limit=10", "train.batch_size=8", "train.max_steps=8", "train.eval_every_epoch=false",
            "tracking.wandb_mode=disabled", *overrides]))

    run(tmp_path / "whole", "data.num_workers=0", "data.cache_decoded=false")
    fast = ("data.num_workers=2", "data.persistent_workers=true", "data.cache_decoded=true")
    part = tmp_path / "part"
    run(part, *fast, "checkpoint.every_steps=3", "checkpoint.keep_last=5")
    for later in ckpt.list_checkpoints(part)[2:]:  # as if the job died after update 6
        shutil.rmtree(later)
    assert ckpt.latest_checkpoint(part).name == "step_00000006"
    assert run(part, *fast, "resume=auto")["updates"] == 8
    a, b = (load_file(str(p / "export" / "model.safetensors")) for p in (tmp_path / "whole", part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the runs ended their persistent workers (resume's skipping loader included): none left for a later gc
    import multiprocessing
    assert multiprocessing.active_children() == []
