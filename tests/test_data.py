"""Tests for carlzoo.training.data: the epoch order, its split over ranks and both pipelines."""

import numpy as np
import pytest
import torch
from torch import Tensor

from carlzoo.training.augment import AugmentConfig, BatchAugment
from carlzoo.training.data import (
    DataLoaderPipeline,
    DeviceImageStore,
    DevicePipeline,
    epoch_permutation,
    rank_batches,
)

CPU = torch.device("cpu")


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize(("n", "batch", "world"), [(100, 12, 1), (100, 12, 3), (37, 8, 4)])
def test_ranks_share_out_each_epoch_without_overlap(n, batch, world):
    perm = epoch_permutation(n, seed=5, epoch=2)
    assert sorted(perm.tolist()) == list(range(n))
    shards = [rank_batches(perm, batch, r, world) for r in range(world)]
    assert {len(s) for s in shards} == {n // batch}  # the same number of steps everywhere
    seen = torch.cat([b for s in shards for b in s]).tolist()
    assert len(seen) == len(set(seen)) == (n // batch) * batch  # drop_last, no repeats
    # Step k of all ranks together is the k-th global batch of the permutation.
    for k in range(n // batch):
        step = torch.cat([s[k] for s in shards])
        assert step.tolist() == perm[k * batch : (k + 1) * batch].tolist()


def test_the_epoch_order_depends_on_seed_and_epoch_only():
    a = epoch_permutation(50, seed=1, epoch=3)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, epoch_permutation(50, seed=1, epoch=3))
    assert not torch.equal(a, epoch_permutation(50, seed=1, epoch=4))
    assert not torch.equal(a, epoch_permutation(50, seed=2, epoch=3))


@pytest.mark.parametrize("pipeline", [DevicePipeline, DataLoaderPipeline])
def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused(pipeline):
    with pytest.raises(ValueError, match="global batch of 6 does not split over 4 processes"):
        pipeline(_images(20), AugmentConfig(), 16, CPU, 6, seed=0, rank=0, world=4)


def _dataloader_views(workers: int, rank: int, images: np.ndarray, epoch: int = 0) -> Tensor:
    pipe = DataLoaderPipeline(
        images, AugmentConfig(), 16, CPU, 8, seed=3, rank=rank, world=2, workers=workers
    )
    return torch.cat([torch.cat([a, b]) for a, b in pipe.epoch(epoch)])


def test_dataloader_views_depend_on_seed_epoch_and_rank_only():
    images = np.repeat(_images(1), 32, axis=0)  # one image: only the augmentation differs
    torch.manual_seed(0)
    in_process = _dataloader_views(0, 0, images)
    torch.manual_seed(1)  # another global RNG state
    assert torch.equal(_dataloader_views(0, 0, images), in_process)
    assert torch.equal(_dataloader_views(2, 0, images), in_process)  # two worker processes
    assert not torch.equal(_dataloader_views(0, 1, images), in_process)  # another rank
    assert not torch.equal(_dataloader_views(0, 0, images, epoch=1), in_process)
    # The pipeline draws from its own generator and leaves the global one as it was.
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    _dataloader_views(0, 0, images)
    assert torch.equal(torch.rand(3), expected)


def test_device_views_differ_between_ranks():
    images = np.repeat(_images(1), 32, axis=0)
    views = [
        torch.cat([torch.cat(v) for v in DevicePipeline(
            images, AugmentConfig(), 16, CPU, 8, seed=3, rank=r, world=2).epoch(0)])
        for r in (0, 1)
    ]
    assert not torch.equal(*views)


def test_the_store_keeps_the_images_as_given_and_gathers_nchw_views():
    images = _images(10, size=6)
    store = DeviceImageStore(images, CPU, budget_bytes=8e9)
    assert store.data.data_ptr() == images.ctypes.data  # no copy, in no other layout
    out = store.gather(torch.tensor([7, 0, 3]))
    assert out.shape == (3, 3, 6, 6) and out.dtype == torch.uint8
    assert torch.equal(out, torch.from_numpy(images[[7, 0, 3]]).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"expected \(N, H, W, 3\) uint8 images, got \(10, 3, 6"):
        DeviceImageStore(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), CPU, 8e9)


def test_views_do_not_depend_on_the_memory_layout_of_the_batch():
    x = torch.from_numpy(_images(8, size=32)).permute(0, 3, 1, 2)  # as the store gathers it
    augment = BatchAugment(AugmentConfig(blur_p=0.5), 32)
    views = [augment(b, generator=torch.Generator().manual_seed(0)) for b in (x, x.contiguous())]
    assert torch.equal(*views)


@pytest.mark.filterwarnings(  # raised inside torch 2.11's compiler
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)
def test_a_compiled_augmentation_gives_the_views_of_the_eager_one():
    images = _images(24, size=20)  # resized to 16 px: crop, flip, jitter, grayscale and blur
    cfg = AugmentConfig(blur_p=0.5)
    eager = DevicePipeline(images, cfg, 16, CPU, 8, seed=3)
    compiled = DevicePipeline(images, cfg, 16, CPU, 8, seed=3, compile_augment=True)
    assert compiled.augment.compiled and "compile=True" in repr(compiled.augment)
    assert not eager.augment.compiled
    pairs = list(zip(eager.epoch(1), compiled.epoch(1), strict=True))
    assert len(pairs) == 3
    for (ea, eb), (ca, cb) in pairs:
        torch.testing.assert_close(ca, ea, atol=1e-5, rtol=0)
        torch.testing.assert_close(cb, eb, atol=1e-5, rtol=0)


def test_both_views_come_from_one_augmentation_call_on_the_doubled_batch():
    # One call on 2b images launches each augmentation kernel once per step, not twice.
    images = _images(16, size=16)
    pipe = DevicePipeline(images, AugmentConfig(), 16, CPU, 8, seed=3)
    calls = []
    augment = pipe.augment

    def spy(x, generator=None):
        calls.append(tuple(x.shape))
        return augment(x, generator=generator)

    pipe.augment = spy
    xa, xb = next(pipe.epoch(2))
    assert calls == [(16, 3, 16, 16)]
    idx = rank_batches(epoch_permutation(16, 3, 2), 8, 0, 1)[0]
    x = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2)
    both = BatchAugment(AugmentConfig(), 16)(torch.cat([x, x]), generator=pipe._generator(2, CPU))
    assert torch.equal(xa, both[:8]) and torch.equal(xb, both[8:])
    assert not torch.equal(xa, xb)  # two independent draws of each image
