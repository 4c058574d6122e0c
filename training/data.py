"""Batches of two augmented views, in one of two pipelines.

``device`` (default): the uint8 training set lives on the accelerator (or in pinned host
memory streamed batch by batch when it exceeds the budget); shuffling, batching and the
per-sample augmentation all run on the device, with no host synchronisation per step.

``dataloader``: the classic torch DataLoader with torchvision PIL transforms in worker
processes; the baseline the throughput benchmark compares against, and the fallback.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from carlzoo.training.augment import AugmentConfig, BatchAugment, torchvision_transform

__all__ = [
    "DeviceImageStore",
    "TwoViewDataset",
    "epoch_permutation",
    "rank_batches",
    "DevicePipeline",
    "DataLoaderPipeline",
    "epoch_seed",
]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of every random draw in one epoch: resuming at an epoch boundary needs no state."""
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**63)


def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The same permutation of ``n`` indices on every rank for a given (seed, epoch).

    Drawn on the CPU: CUDA's random numbers for a seed depend on the card (its kernels are
    sized by the number of multiprocessors), so ranks on different GPU models would each
    shuffle differently and their shards would overlap.
    """
    g = torch.Generator()
    g.manual_seed(epoch_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def rank_batches(perm: Tensor, global_batch: int, rank: int, world: int) -> list[Tensor]:
    """Split a permutation into this rank's batches (drop_last; equal sizes on all ranks)."""
    local = global_batch // world
    steps = perm.numel() // global_batch
    view = perm[: steps * global_batch].view(steps, world, local)  # (steps, W, b)
    return list(view[:, rank].unbind(0))


class DeviceImageStore:
    """uint8 images on the device when they fit ``budget_bytes``, else pinned on the host.

    The images stay in the (N, H, W, 3) layout they come in, so the store makes no copy in
    another layout: on the CPU it shares the caller's array, on an accelerator it holds one
    copy of it (ImageNet 64x64 is 15.7 GB), and pinned it holds one host copy. Each batch is
    gathered in that layout and returned as a (b, 3, H, W) view.
    """

    def __init__(self, images: np.ndarray, device: torch.device, budget_bytes: float) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"expected (N, H, W, 3) uint8 images, got {images.shape} {images.dtype}"
            )
        nhwc = torch.from_numpy(np.ascontiguousarray(images))
        self.device = device
        self.resident = device.type == "cpu" or nhwc.numel() <= budget_bytes
        if device.type == "cpu":
            self.data = nhwc
        elif self.resident:
            self.data = nhwc.to(device)
        else:
            self.data = nhwc.pin_memory()

    def __len__(self) -> int:
        return self.data.shape[0]

    def gather(self, idx: Tensor) -> Tensor:
        """(b, 3, H, W) uint8 on the device (a channels-last view of the gathered images)."""
        if self.resident:
            out = self.data.index_select(0, idx)
        else:
            out = self.data.index_select(0, idx.cpu()).pin_memory()
            out = out.to(self.device, non_blocking=True)
        return out.permute(0, 3, 1, 2)


class _Pipeline:
    """What both pipelines share: sizes, seeds, this rank's share of the global batch."""

    def __init__(
        self,
        n: int,
        device: torch.device,
        global_batch: int,
        seed: int,
        rank: int,
        world: int,
        channels_last: bool,
    ) -> None:
        if global_batch % world:
            raise ValueError(
                f"the global batch of {global_batch} does not split over {world} processes; "
                f"use a multiple of {world}"
            )
        if n < global_batch:
            raise ValueError(
                f"the training set has {n} images, fewer than one batch of {global_batch}; "
                "lower optim.batch_size"
            )
        self.n, self.device, self.global_batch = n, device, global_batch
        self.seed, self.rank, self.world = seed, rank, world
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return self.n // self.global_batch

    def _generator(self, epoch: int, device: torch.device) -> torch.Generator:
        """The augmentation RNG of this rank for ``epoch``."""
        g = torch.Generator(device=device)
        g.manual_seed(epoch_seed(self.seed, epoch, self.rank) + 1)
        return g


class DevicePipeline(_Pipeline):
    """Shuffle, batch and augment on the device; yields (view_a, view_b) float tensors."""

    def __init__(
        self,
        images: np.ndarray,
        cfg: AugmentConfig,
        size: int,
        device: torch.device,
        global_batch: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        budget_bytes: float = 8e9,
        channels_last: bool = False,
        compile_augment: bool = False,
    ) -> None:
        super().__init__(len(images), device, global_batch, seed, rank, world, channels_last)
        self.store = DeviceImageStore(images, device, budget_bytes)
        self.augment = BatchAugment(cfg, size, compile=compile_augment)

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        perm = epoch_permutation(self.n, self.seed, epoch)
        if self.store.resident and self.device.type != "cpu":
            # Once per epoch, without a host sync: the batches index the device copy.
            perm = perm.pin_memory().to(self.device, non_blocking=True)
        g = self._generator(epoch, self.device)
        fmt = self.memory_format
        for idx in rank_batches(perm, self.global_batch, self.rank, self.world):
            x = self.store.gather(idx)
            # Both views in one call: each augmentation kernel runs once on 2b images rather
            # than twice on b (half the launches and dispatches; the first b are view a).
            xa, xb = self.augment(torch.cat([x, x]), generator=g).chunk(2)
            yield xa.contiguous(memory_format=fmt), xb.contiguous(memory_format=fmt)


class TwoViewDataset(Dataset):
    """Two independently augmented views of each image, through PIL transforms.

    Indexed by ``i`` the views draw from torch's global RNG, as torchvision's transforms do;
    indexed by ``(i, seed)`` they draw from that seed alone and leave the global RNG as it was,
    so the views depend on neither the worker process nor what ran before.
    """

    def __init__(self, images: np.ndarray, cfg: AugmentConfig, size: int) -> None:
        self.images = images
        self.transform = torchvision_transform(cfg, size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        if isinstance(item, tuple):
            i, seed = item
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # the CPU RNG the transforms use
                return self._views(i)
        return self._views(item)

    def _views(self, i: int) -> tuple[Tensor, Tensor]:
        img = Image.fromarray(self.images[i])
        return self.transform(img), self.transform(img)


class DataLoaderPipeline(_Pipeline):
    """torch DataLoader + torchvision transforms in ``workers`` processes."""

    def __init__(
        self,
        images: np.ndarray,
        cfg: AugmentConfig,
        size: int,
        device: torch.device,
        global_batch: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        workers: int = 8,
        channels_last: bool = False,
    ) -> None:
        super().__init__(len(images), device, global_batch, seed, rank, world, channels_last)
        self.dataset = TwoViewDataset(images, cfg, size)
        self.workers = workers

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        perm = epoch_permutation(self.n, self.seed, epoch)
        batches = rank_batches(perm, self.global_batch, self.rank, self.world)
        # One seed per sample from this rank's epoch generator: the views depend on
        # (seed, epoch, rank) alone, not on the number of workers or the global RNG.
        seeds = torch.randint(
            2**62, (len(batches), self.global_batch // self.world),
            generator=self._generator(epoch, torch.device("cpu")),
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=[
                list(zip(b.tolist(), s.tolist(), strict=True))
                for b, s in zip(batches, seeds, strict=True)
            ],
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            generator=self._generator(epoch, torch.device("cpu")),  # its base seed: not global
        )
        fmt = self.memory_format
        for xa, xb in loader:
            yield (
                xa.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
                xb.to(self.device, non_blocking=True).contiguous(memory_format=fmt),
            )
