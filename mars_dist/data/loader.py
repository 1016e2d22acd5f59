"""The trainer's data loaders: worker processes, pinned memory, persistence, prefetch and the decoded-image cache
(the `data.*` keys of mars_dist/config.py), with batches that are the same whatever these settings are.

Per-item augmentation seeds depend on the epoch (mars_dist/data/dataset.py). A loader's workers hold copies of the
dataset made when they start; persistent workers start once, so an epoch set on the training process's copy would
never reach them and every epoch would repeat the augmentation of epoch 0. Here the epoch travels with every index
instead: the batch sampler yields `(epoch, i)` pairs, read at the start of each pass from the sampler that orders
the pass. That sampler's epoch is the one the order was drawn from (accelerate's seedable sampler, reseeded per
epoch), so order and augmentation cannot disagree, whichever process or worker loads the item; the pairs pass
unchanged through accelerate's sharding (BatchSamplerShard) and `skip_first_batches` (SkipBatchSampler), which
only regroup what this sampler yields. (A shared-memory epoch read by the workers was the other choice; it
holds only while one loader at a time reads the dataset and the value is written before that loader's next pass
starts prefetching, and it needs memory shared across the worker start method. The pairs need none of that.)
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from mars_dist.data.dataset import estimate_decoded_bytes

MAX_AUTO_WORKERS = 16
"""`num_workers: auto` never exceeds this per process: more workers add memory and start-up time for little gain
(one core decodes and augments a few hundred images a second; 16 feed several thousand)."""


class EpochBatchSampler(BatchSampler):
    """A BatchSampler whose batches are lists of `(epoch, index)`: the epoch is the sampler's (`sampler.epoch`,
    which accelerate's seedable sampler and torch's DistributedSampler have) or, for one without, the one given to
    `set_epoch`."""

    def __init__(self, sampler, batch_size: int, drop_last: bool):
        super().__init__(sampler, batch_size, drop_last)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", self.epoch)  # before the pass: the sampler advances it at the end
        for batch in super().__iter__():
            yield [(epoch, i) for i in batch]


def local_processes() -> int:
    """Training processes on this node: LOCAL_WORLD_SIZE (torchrun and accelerate launch set it), else WORLD_SIZE
    (other launchers: taken as one node, which errs towards fewer workers), else 1."""
    for var in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    return 1


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what SLURM, taskset or a container grants), not the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def auto_workers(cpus: int | None = None, processes: int | None = None) -> int:
    """Workers per process for `num_workers: auto`: this process's share of the CPUs, less one core for the
    training process itself, at most MAX_AUTO_WORKERS; 0 (load in the training process) when no core is left."""
    cpus = usable_cpus() if cpus is None else cpus
    processes = local_processes() if processes is None else processes
    return max(0, min(MAX_AUTO_WORKERS, cpus // max(1, processes) - 1))


def resolve_workers(setting: int | str) -> int:
    return auto_workers() if setting == "auto" else int(setting)


def resolve_pin_memory(setting: bool | str, device: torch.device | str | None = None) -> bool:
    """'auto': pin when the batches go to a GPU (`device`, else whether CUDA is available)."""
    if setting != "auto":
        return bool(setting)
    return torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()


def maybe_cache(ds, settings, say: Callable[[str], None] = print) -> bool:
    """Decode `ds`'s images into memory when `settings.cache_decoded` is true, or 'auto' and the estimated decoded
    size is at most `settings.cache_max_bytes`; says what it took. True when cached."""
    if ds.decoded is not None:
        return True
    mode = settings.cache_decoded
    if mode is False:
        return False
    if mode == "auto":
        estimate = estimate_decoded_bytes(ds.ds)
        if estimate > settings.cache_max_bytes:
            say(f"data: not caching {len(ds)} decoded images (about {_mb(estimate)}, above data.cache_max_bytes "
                f"{_mb(settings.cache_max_bytes)}); they are decoded again in every epoch")
            return False
    taken = ds.cache_decoded()
    say(f"data: cached {len(ds)} decoded images in memory: {_mb(taken)} per process")
    return True


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def build_loader(ds, settings, batch_size: int, seed: int, shuffle: bool = False, drop_last: bool = False,
                 cache: bool = False, device: torch.device | str | None = None,
                 say: Callable[[str], None] = print) -> DataLoader:
    """A DataLoader over `ds` (an ImageClassificationDataset) with the loading settings of `settings` (the
    DataConfig), its batches lists of `(epoch, index)`. `seed` seeds the shuffle (accelerate's seedable sampler
    replaces the sampler under `prepare` and keeps its generator). `cache`: `settings.cache_decoded` applies to this
    set (one read per epoch); a set read once gains nothing from decoding ahead. `device`: where batches go, for
    `pin_memory: auto`. `say` prints the choices (pass accelerator.print: the main process only)."""
    if cache:
        maybe_cache(ds, settings, say)
    workers = resolve_workers(settings.num_workers)
    generator = torch.Generator().manual_seed(seed)
    # the sampler the DataLoader itself would make for shuffle=True: the same order as a plain shuffled loader
    sampler = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    extra = {"persistent_workers": settings.persistent_workers, "prefetch_factor": settings.prefetch_factor}
    if shuffle:
        say(f"data: {workers} loader worker(s) per process (data.num_workers={settings.num_workers}, "
            f"{usable_cpus()} CPUs, {local_processes()} process(es) on this node)"
            + (f", persistent={settings.persistent_workers}, prefetch {settings.prefetch_factor}" if workers else ""))
    return DataLoader(ds, batch_sampler=EpochBatchSampler(sampler, batch_size, drop_last), num_workers=workers,
                      pin_memory=resolve_pin_memory(settings.pin_memory, device), generator=generator,
                      **(extra if workers else {}))  # torch refuses both without workers


def release_workers(*loaders) -> None:
    """Stop now the worker processes `loaders` keep between passes (persistent workers). Otherwise they live until
    the loader is garbage collected: after a run inside a longer Python process (a notebook, a sweep, the API) that
    is at some later `gc.collect()`, which then waits seconds per worker for them to exit. torch keeps the live
    iterator of a persistent loader in `DataLoader._iterator` and has no public call to end it."""
    for loader in loaders:
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        if hasattr(loader, "_iterator"):
            loader._iterator = None
