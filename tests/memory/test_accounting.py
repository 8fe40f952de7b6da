"""The live-tensor tracker against allocations whose sizes are known."""

import torch

from mosaic_dllm.memory.accounting import LiveTensorTracker


def test_counts_new_storages_and_ignores_views_and_in_place_ops():
    weight = torch.randn(100, 100)  # exists before: never counted
    with LiveTensorTracker() as tracker:
        a = torch.randn(1000)  # +4000
        view = a.view(10, 100)  # view: +0
        b = a * 2  # +4000
        b.add_(1)  # in place: +0
        c = weight @ weight  # +40000
        out = torch.empty(10, 100)  # +4000
        torch.matmul(view, weight, out=out)  # out=: +0
        del a, view  # -4000 once the last reference goes
        d = torch.zeros(25)  # +100
        del c  # -40000
        e = b.sum()  # +4
    live = [r.live_bytes for r in tracker.timeline.records]
    new = [r.new_bytes for r in tracker.timeline.records]
    assert new == [4000, 0, 4000, 0, 40000, 4000, 0, 100, 4]
    assert live == [4000, 4000, 8000, 8000, 48000, 52000, 52000, 48100, 8104]
    assert tracker.timeline.peak == 52000
    assert tracker.live == 8104 and d.numel() and e.numel() and out.numel()


def test_freed_mid_step_and_derived_figures():
    with LiveTensorTracker() as tracker:
        for _ in range(3):
            x = torch.ones(256)  # 1024 bytes, the previous x freed on rebinding
            y = x + 1
            del y
    t = tracker.timeline
    assert t.peak == 2048  # x and y together, never more
    assert [r.live_bytes for r in t.records] == [1024, 2048] + [2048, 2048] * 2
    assert abs(t.par - t.peak / t.average) < 1e-12


def test_split_at_the_first_vocabulary_wide_tensor():
    vocab = 777
    with LiveTensorTracker() as tracker:
        h = torch.ones(4, 8)  # body: 128 bytes
        logits = torch.ones(4, vocab)  # logits phase starts here
        del h
        p = torch.softmax(logits, -1)
    body, head = tracker.timeline.split(vocab)
    assert body == 128 and head == 2 * 4 * vocab * 4 and p.numel()  # h is gone before the softmax


def test_meta_tensors_a_planner_traces_are_not_in_the_timeline():
    vocab = 777
    with LiveTensorTracker() as tracker:
        h = torch.ones(4, 8)
        planned = torch.empty(4, vocab, device="meta") * 2  # a plan being traced mid-step
        logits = torch.ones(4, vocab)
    assert [r.op for r in tracker.timeline.records] == ["ones", "ones"]
    assert tracker.timeline.split(vocab) == (128, 128 + 4 * vocab * 4)
    assert h.numel() and planned.numel() and logits.numel()
