"""Unit tests: transfer schedules, CFG formula, Dream's shift, EOS early exit, step callbacks."""

from types import SimpleNamespace

import pytest
import torch

from mosaic_dllm import GenerationCancelled, GenerationConfig
from mosaic_dllm.decoding import dream, llada
from mosaic_dllm.decoding.common import answer_complete
from mosaic_dllm.decoding.schedule import dream_timesteps, dream_transfer_count, llada_transfer_counts


def test_llada_transfer_counts_front_load_the_remainder():
    counts = llada_transfer_counts(torch.ones(1, 12, dtype=torch.bool), 5)
    assert counts.tolist() == [[3, 3, 2, 2, 2]]
    assert llada_transfer_counts(torch.ones(2, 8, dtype=torch.bool), 8).tolist() == [[1] * 8] * 2
    partial = torch.tensor([[True, False, True, True, False, True, True]])
    assert llada_transfer_counts(partial, 2).tolist() == [[3, 2]]


def test_dream_transfer_counts():
    steps, ts = 16, dream_timesteps(16, 1e-3)
    mask = torch.ones(1, 16, dtype=torch.bool)
    assert dream_transfer_count(mask, 0, steps, ts) == 0  # int(16 * (1 - s/t)) rounds down to 0
    assert dream_transfer_count(mask, steps - 1, steps, ts) == 16  # everything left at the last step
    assert dream_transfer_count(torch.ones(1, 64, dtype=torch.bool), 0, 4, dream_timesteps(4, 1e-3)) == 15


def test_cfg_formula():
    cond = torch.tensor([[1.0, 2.0]])
    un = torch.tensor([[0.5, -1.0]])
    x = torch.tensor([[3, 4]])
    batch = llada.guidance_batch(x, torch.tensor([[True, False]]), mask_id=9, cfg_scale=2.0)
    assert batch.tolist() == [[3, 4], [9, 4]]  # unconditional copy: prompt replaced by the mask
    assert torch.equal(llada.cfg_combine(2.0)(torch.stack([cond, un])), un + 3.0 * (cond - un))
    assert llada.guidance_batch(x, x > 0, 9, 0.0) is x
    assert torch.equal(llada.cfg_combine(0.0)(torch.stack([cond])), cond)


def test_dream_shift():
    logits = torch.arange(4.0).view(1, 4, 1)
    spec = SimpleNamespace(mask_token_id=3, eos_token_ids=(2,), logit_shift=True, max_position_embeddings=64)
    shifted = dream.DreamSampler(spec)
    assert logits[:, shifted.hidden_rows(torch.arange(4))].flatten().tolist() == [0.0, 0.0, 1.0, 2.0]


def test_answer_complete():
    mask, eos = 9, (7,)
    assert not answer_complete(torch.tensor([1, 9, 7, 9]), 1, mask, eos)  # a masked position before the EOS
    assert answer_complete(torch.tensor([1, 2, 7, 9]), 1, mask, eos)
    assert not answer_complete(torch.tensor([1, 2, 3, 9]), 1, mask, eos)


class SyntheticExecutor:
    """Full-logits executor over a fixed function of the canvas (no network)."""

    def __init__(self, fn, vocab):
        self.logits, self.vocab = fn, vocab

    def row_logits(self, ids, rows, sampler_row_bytes=0):
        yield torch.arange(ids.shape[1]), self.logits(ids)


def sampler_of(module, executor, eos=(7,)):
    spec = SimpleNamespace(
        mask_token_id=31, eos_token_ids=eos, vocab_size=executor.vocab, logit_shift=True, max_position_embeddings=64
    )
    return module.LLaDASampler(spec) if module is llada else module.DreamSampler(spec)


def run(module, executor, prompt, cfg, gen, callback=None):
    """The scheduler's loop for one request over a synthetic executor: resolve, start, step until done
    (a callback returning False cancels, as the scheduler does)."""
    sampler = sampler_of(module, executor)
    state = sampler.start(prompt, sampler.resolve(cfg), gen)
    while not state.done:
        step = state.next_step()
        event = state.advance(lambda step=step: executor.row_logits(step.ids, step.rows))
        if callback is not None and callback(event) is False:
            raise GenerationCancelled(f"cancelled at step {event.step}")
    return state.result()


def synthetic_logits(vocab=32, eos=7, eos_from=5, prompt_len=3, seed=0):
    """Peaked random logits that make EOS the likely token from generated position `eos_from` on."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, 64, vocab, generator=g) * 3
    base[0, prompt_len + eos_from :, eos] += 8

    def fn(x):
        masked = (x == vocab - 1).sum()
        return base[:, : x.shape[1]].expand(x.shape[0], -1, -1) * (1 + 0.01 * masked)

    return SyntheticExecutor(fn, vocab)


@pytest.mark.parametrize(
    "module,settings,saves_steps",
    [
        (llada, dict(gen_length=24, steps=12, block_length=6), True),  # later blocks are skipped
        (llada, dict(gen_length=24, steps=24, block_length=24, temperature=0.9), False),
        (dream, dict(gen_length=24, steps=12, alg="maskgit_plus"), False),
        (dream, dict(gen_length=24, steps=12, alg="origin", temperature=0.5), True),
    ],
)
def test_eos_early_exit_returns_the_same_answer(module, settings, saves_steps):
    fn, prompt = synthetic_logits(), torch.tensor([1, 2, 3])
    runs = []
    for stop in (False, True):
        cfg = GenerationConfig(seed=3, stop_at_eos=stop, **settings)
        runs.append(run(module, fn, prompt, cfg, torch.Generator().manual_seed(3)))
    full, early = runs
    gen_full, gen_early = full.canvas[3:], early.canvas[3:]
    first = int((gen_full == 7).nonzero()[0])
    assert early.stopped_at_eos and not full.stopped_at_eos
    assert early.steps_run < full.steps_run if saves_steps else early.steps_run <= full.steps_run
    assert torch.equal(gen_early[: first + 1], gen_full[: first + 1])


def test_callback_sees_every_step_and_can_cancel():
    fn, prompt = synthetic_logits(), torch.tensor([1, 2, 3])
    cfg = GenerationConfig(gen_length=8, steps=4, block_length=4)
    events = []
    run(llada, fn, prompt, cfg, torch.Generator(), callback=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4] and [e.block for e in events] == [0, 0, 1, 1]
    assert sum(e.revealed for e in events) == 8 and (events[-1].canvas == 31).sum() == 0
    with pytest.raises(GenerationCancelled):
        run(llada, fn, prompt, cfg, torch.Generator(), callback=lambda e: e.step < 2)
