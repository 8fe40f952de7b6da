"""The arena: views at offsets, pages committed on touch and given back by trim; CUDA where present."""

import pytest
import torch

from mosaic_dllm.memory.arena import Arena, ArenaError


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_cpu_arena_commits_on_touch_and_trim_gives_pages_back():
    arena = Arena("cpu", reserve_bytes=1 << 30)
    arena.ensure(64 << 20)
    before = rss_bytes()
    x = arena.view(0, (16 << 20,), torch.float32)  # 64 MiB
    assert rss_bytes() - before < 8 << 20  # reserved, not committed
    x.fill_(1.0)
    assert rss_bytes() - before > 56 << 20  # committed by the writes
    arena.trim(0)
    assert rss_bytes() - before < 8 << 20
    assert float(x[123]) == 0.0  # the contents are gone; the mapping itself stays valid


def test_views_at_offsets_share_the_arena():
    arena = Arena("cpu", reserve_bytes=1 << 20)
    arena.ensure(4096)
    a = arena.view(0, (4, 4), torch.float32)
    b = arena.view(32, (8,), torch.float32)  # bytes 32..64: rows 2 and 3 of a
    b.copy_(torch.arange(8.0))
    assert torch.equal(a[2:].flatten(), torch.arange(8.0))
    with pytest.raises(ArenaError, match="does not fit"):
        arena.view(1 << 20, (2,), torch.float32)


def test_tensor_backing_grows_in_two_mib_steps():
    arena = Arena("cpu", backing="tensor")
    arena.ensure(100)
    assert arena.capacity == 2 << 20
    arena.ensure((2 << 20) + 1)
    assert arena.capacity == 4 << 20
    arena.trim(0)
    assert arena.capacity == 0


def test_bad_backing_is_refused():
    with pytest.raises(ValueError, match="backing"):
        Arena("cpu", backing="shm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_arena_views_and_release():
    arena = Arena("cuda")
    arena.ensure(3 << 20)
    assert arena.capacity == 4 << 20
    x = arena.view(256, (1024,), torch.bfloat16)
    x.fill_(1)
    assert x.device.type == "cuda" and float(x.sum()) == 1024
    del x
    arena.trim(0)
    assert arena.capacity == 0


def test_large_transient_buffers_give_their_memory_back():
    """What kernels allocate outside the arena (planned as workspace) must not stay resident once
    freed: with the arena's allocator setting, 16 MiB buffers allocated and freed one after another
    leave RSS where it was."""
    from mosaic_dllm.memory.arena import map_large_allocations
    from mosaic_dllm.memory.rss import current_rss_bytes, release_free_heap

    Arena("cpu")  # a CPU arena applies the setting
    map_large_allocations()
    release_free_heap()
    before = current_rss_bytes()
    for _ in range(4):
        buffer = torch.ones(4 << 20)  # 16 MiB, touched
        del buffer
    assert current_rss_bytes() - before < 4 << 20
