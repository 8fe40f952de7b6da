"""Masked-diffusion training: the loss falls, runs resume exactly, exports load as LLaDA checkpoints."""

import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.train import corpus
from mosaic_dllm.train.bpe import save_tokenizer, train_bpe
from mosaic_dllm.train.trainer import TrainConfig, Trainer, evaluate
from tests.tiny import tiny_spec

PATTERN = torch.arange(0, 50).repeat(200)  # a corpus whose masked tokens are predictable from neighbours


def small_config(**kw) -> TrainConfig:
    return TrainConfig(
        **{
            "steps": 60,
            "batch_size": 8,
            "seq_len": 32,
            "lr": 3e-3,
            "warmup": 10,
            "eval_every": 10**9,
            "save_every": 10**9,
        }
        | kw
    )


def test_a_few_steps_reduce_the_loss(tmp_path):
    spec = tiny_spec("llada", ids={"mask": 317, "eos": 316})
    trainer = Trainer(spec, small_config(), PATTERN, PATTERN, tmp_path)
    before = evaluate(spec, trainer.params, PATTERN, 32, batches=2, batch_size=8)
    trainer.train()
    after = evaluate(spec, trainer.params, PATTERN, 32, batches=2, batch_size=8)
    assert after < before - 1.0, (before, after)


def test_resume_continues_exactly(tmp_path):
    spec = tiny_spec("llada", ids={"mask": 317, "eos": 316})
    straight = Trainer(spec, small_config(steps=6), PATTERN, PATTERN, tmp_path / "a")
    straight.train()
    first = Trainer(spec, small_config(steps=3, save_every=3), PATTERN, PATTERN, tmp_path / "b")
    first.train()
    resumed = Trainer(spec, small_config(steps=6), PATTERN, PATTERN, tmp_path / "b")
    assert resumed.load_state() and resumed.step == 3
    resumed.train()
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=0, atol=0)


def test_export_is_a_loadable_llada_checkpoint(tmp_path):
    tok = train_bpe(["Return the value of the attribute.", "Open the file."] * 20, "llada", 320)
    ids = save_tokenizer(tmp_path, tok, "llada")
    spec = tiny_spec("llada", ids=ids)
    trainer = Trainer(spec, small_config(steps=2), PATTERN, PATTERN, tmp_path / "run")
    trainer.train()
    trainer.export(tmp_path)
    llm = LLM(tmp_path)
    assert llm.spec.family == "llada" and llm.checkpoint.dtype == torch.bfloat16
    assert len(llm.generate("Return the", GenerationConfig(gen_length=8, steps=4))[0].token_ids) == 8


def test_corpus_is_deterministic_prose():
    texts = corpus.build(max_bytes=20_000)
    assert texts == corpus.build(max_bytes=20_000) and len(texts) > 100
    assert all(t[0].isupper() and "\n" not in t for t in texts)
    assert corpus.summary("Return the size.  More text.\n\nDetails.") == "Return the size."
    assert corpus.summary(">>> x = 1") is None
    train, val = corpus.split(texts)
    assert len(val) >= 1 and not set(train) & set(val)
