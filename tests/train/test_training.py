"""Masked-diffusion training: the loss falls, runs resume exactly, exports load as LLaDA checkpoints."""

import json

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


def test_corpus_is_whole_stdlib_files_held_out_by_file():
    source = corpus.build(max_files=40)
    assert source == corpus.build(max_files=40)
    assert len(source.held_out) == 2 and not set(source.train) & set(source.held_out)
    assert all(name.endswith(".py") and "encodings/" not in name for name in source.train)
    text = source.texts(source.held_out[:1])[0]
    assert "\n    " in text and "def " in text  # whole files: indentation and code, not extracts
    described = source.describe()
    assert described["held_out_files"] == list(source.held_out) and len(described["sha256"]) == 64


def test_the_code_tokenizer_gives_indentation_and_names_their_own_tokens():
    text = "def area(self, width):\n        return self.height * width\n"
    tok = train_bpe([text * 30, "import os\n" * 30], "llada", 400, code=True)
    tokens = tok.encode(text).tokens
    assert "\u010a\u0120\u0120\u0120\u0120\u0120\u0120\u0120\u0120" in tokens  # newline + 8 spaces: one token
    assert "\u0120self" in tokens and tok.decode(tok.encode(text).ids) == text


def test_mosaic_train_quick_writes_a_checkpoint_that_generates_and_resumes(tmp_path, capsys):
    from mosaic_dllm.cli import main

    out, run = tmp_path / "model", tmp_path / "run"
    assert main(["train", "--quick", "--steps", "10", "--out", str(out), "--run-dir", str(run)]) == 0
    assert main(["train", "--quick", "--out", str(out), "--run-dir", str(run), "--overwrite"]) == 0
    assert "held-out CE" in capsys.readouterr().out
    figures = json.loads((out / "training.json").read_text())
    assert [h["step"] for h in figures["history"]] == [10, 20]  # the second run resumed at step 10
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert figures["corpus"]["held_out_files"] and figures["held_out_masked_token_ce_nats"] > 0
    llm = LLM(out)
    assert llm.generate("def ", GenerationConfig(gen_length=8, steps=8, block_length=8))[0].token_ids
