# The data pipeline shared by every dataset and method: a resumable distributed sampler, per-sample seeding of
# the random transforms, and the DataLoader.
#
# Reproducibility: the order of images comes from (seed, epoch) through DistributedSampler, the random crop of
# image i in epoch e from seed_from(seed, e, i), and masks from (seed, rank, step) in the collator. None of it
# depends on num_workers or on where a run was interrupted, so a resumed run sees the same batches.

import logging

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from src.masks.utils import seed_from

logger = logging.getLogger()


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first `start_batch` batches (mid-epoch resume)."""

    def __init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch, start_batch=0, batch_size=1):
        """Also sets the epoch of the dataset it samples (a SeededDataset), so that a loop that only calls
        `sampler.set_epoch(epoch)`, as ijepa's does, gets new crops every epoch."""
        super().set_epoch(epoch)
        if hasattr(self.dataset, 'set_epoch'):
            self.dataset.set_epoch(epoch)
        self.skip = start_batch * batch_size

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


class SeededDataset(Dataset):
    """Wraps a dataset so that the random transform of sample i in epoch e is seeded by (seed, e, i).

    The process-global torch RNG is saved and restored around each sample, so nothing else is disturbed.
    """

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_from(self.seed, self.epoch, index))
            return self.dataset[index]


class TrainLoader:
    """DataLoader + sampler + seeding, restartable at any (epoch, batch)."""

    def __init__(self, dataset, batch_size, collator, world_size=1, rank=0, seed=0, num_workers=0,
                 pin_mem=False, drop_last=True):
        if len(dataset) < batch_size * world_size:
            raise ValueError(f'the dataset has {len(dataset)} images, fewer than one batch of data.batch_size='
                             f'{batch_size} per process x {world_size} processes')
        self.dataset = SeededDataset(dataset, seed)
        self.sampler = ResumableDistributedSampler(self.dataset, num_replicas=world_size, rank=rank, seed=seed)
        self.batch_size = batch_size
        self.collator = collator
        self.loader = DataLoader(
            self.dataset, collate_fn=collator, sampler=self.sampler, batch_size=batch_size, drop_last=drop_last,
            pin_memory=pin_mem and torch.cuda.is_available(), num_workers=num_workers,
            persistent_workers=False)
        # batches per epoch (before any mid-epoch skip)
        self.iterations_per_epoch = self.sampler.num_samples // batch_size

    def __len__(self):
        return self.iterations_per_epoch

    def epoch(self, epoch, start_batch=0, global_step=0):
        """Iterator over the batches of `epoch` from `start_batch` on; the first one is step `global_step`."""
        self.sampler.set_epoch(epoch, start_batch, self.batch_size)      # and the dataset's (the crops)
        if hasattr(self.collator, 'set_step'):
            self.collator.set_step(global_step)
        return iter(self.loader)
