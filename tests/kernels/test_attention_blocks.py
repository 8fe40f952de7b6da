"""Attention by query blocks is the whole fused call, bit for bit, on shapes searched for breakage.

PyTorch's CPU flash-attention kernel picks its query split (32 / 64 / 256 rows) and, on AMX CPUs,
whether it packs K/V for the brgemm path from the number of queries in the call, so a call on a
block of queries may run other arithmetic than the whole call did (one bf16 ulp in a few outputs,
enough to flip a top-k tie). Which blocks keep every row's arithmetic is measured per device and
dtype (`device.probes.probe_attention`); the attention group's chunks follow the device's rule.
"""

import pytest
import torch
import torch.nn.functional as F

from mosaic_dllm.device import profile_for
from mosaic_dllm.device.probes import ATTENTION_CANDIDATES, blocks_exact
from mosaic_dllm.kernels.memory import AllocatorMemory
from mosaic_dllm.kernels.planned import PlannedOps
from mosaic_dllm.models.groups import Chunks, group_spans
from mosaic_dllm.models.packing import Packing

# (length, heads, kv heads, head dim): lengths just above the block thresholds and between them,
# plain and grouped heads, head dims that do and do not fill a 64-wide pack.
SHAPES = [(1536, 4, 4, 64), (1600, 8, 2, 64), (1793, 2, 2, 32), (2000, 6, 3, 80), (2304, 4, 4, 128)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def qkv(length, heads, kv_heads, head_dim, dtype, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed + length)
    q = torch.randn(batch, heads, length, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def token_major(t):
    """(B, heads, L, hd) -> the packed (1, B * L, heads, hd) layout the kernels take."""
    return t.transpose(1, 2).reshape(1, -1, t.shape[1], t.shape[3]).contiguous()


def whole(q, k, v):
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    out = F.scaled_dot_product_attention(q, k, v, **gqa)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_query_blocks_equal_the_whole_call(shape, dtype):
    q, k, v = qkv(*shape, dtype, batch=2 if shape[0] == 1600 else 1)
    expected = whole(q, k, v)
    rules = profile_for("cpu").rules(dtype)
    group = rules.group("attention")
    for pieces in (2, 3):
        ops = PlannedOps(AllocatorMemory(rules), Chunks(attention=pieces))
        blocks = group_spans(shape[0], pieces, group)
        assert len(blocks) >= 2 and all(s % group.align == 0 for s, _ in blocks)
        packing = Packing.uniform(q.shape[0], shape[0])
        got = ops.attention(token_major(q), token_major(k), token_major(v), packing, 0, name="attention")
        assert torch.equal(got.view(expected.shape), expected), f"{pieces} pieces: {blocks}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_profile_chose_the_least_restrictive_exact_blocks(dtype):
    """Each looser candidate rule than the one the profile chose breaks some row's bits on some
    shape, so the constraint is needed here; where none does (naive blocks never differ on this
    device), the profile chose the loosest rule."""
    rule = profile_for("cpu").rules(dtype).attention
    cpu = torch.device("cpu")
    looser = ATTENTION_CANDIDATES[: ATTENTION_CANDIDATES.index((rule.align, rule.min_block))]
    for align, min_block in looser:  # measured again, not read from the cached profile
        assert not blocks_exact(align, min_block, dtype, cpu), f"blocks of {min_block} from multiples of {align}"
    assert blocks_exact(rule.align, rule.min_block, dtype, cpu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blocks_are_never_short(dtype):
    group = profile_for("cpu").rules(dtype).group("attention")
    for length in range(1, 5000, 37):
        for pieces in (1, 2, 3, 8, 64):
            blocks = group_spans(length, pieces, group)
            assert blocks[0][0] == 0 and blocks[-1][1] == length
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
            assert len(blocks) == 1 or all(e - s >= group.min_block for s, e in blocks)


def test_the_kernels_copy_of_keys_and_values_is_declared():
    """The fused kernel's internal K/V repack (bf16 on AMX CPUs; none measured elsewhere) is real
    memory outside the arena: the planned kernels declare what the profile measured, and a call's
    measured growth stays within what they declare."""
    from mosaic_dllm.memory.rss import PeakMemory

    queries, keys, heads, head_dim, dtype = 768, 8192, 16, 128, torch.bfloat16
    declared = profile_for("cpu").rules(dtype).key_copy_bytes(keys, heads, head_dim)
    q, k, v = qkv(keys, heads, heads, head_dim, dtype)
    q = q[:, :, :queries]
    F.scaled_dot_product_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])  # kernel set up
    with PeakMemory() as measured:
        F.scaled_dot_product_attention(q, k, v)
    output = heads * queries * (head_dim * dtype.itemsize + 4)
    assert measured.growth_bytes <= declared + output + (4 << 20)
    if declared:  # this CPU packs: the declaration is what it costs, not a guess far above it
        assert measured.growth_bytes >= declared
