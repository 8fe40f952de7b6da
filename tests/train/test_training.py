"""Masked-diffusion training: the loss falls, runs resume exactly, exports load as LLaDA checkpoints."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.train import corpus
from mosaic_dllm.train import trainer as trainer_module
from mosaic_dllm.train.bpe import save_tokenizer, train_bpe
from mosaic_dllm.train.default_model import function_samples
from mosaic_dllm.train.trainer import (
    DistillStage,
    FunctionStage,
    TrainConfig,
    Trainer,
    certainty_forcing_loss,
    evaluate,
    semi_autoregressive_mask,
)
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


def test_certainty_forcing_adds_the_entropy_of_the_tokens_the_model_already_gets_right(tmp_path):
    spec = tiny_spec("llada", ids={"mask": 317, "eos": 316})
    params = Trainer(spec, small_config(), PATTERN, PATTERN, tmp_path).params
    with torch.no_grad():
        params["model.transformer.ff_out.weight"].zero_()  # every logit 0: argmax token 0, entropy log V
    log_v = math.log(spec.vocab_size)
    for answer, right in ((torch.zeros(8, dtype=torch.long), True), (torch.full((8,), 7), False)):
        pairs = [(torch.arange(5), answer)] * 3
        losses = [
            float(certainty_forcing_loss(spec, params, pairs, 4, torch.Generator().manual_seed(1), weight).detach())
            for weight in (0.0, 1.0, 2.0)
        ]
        expected = [log_v * (1 + weight * right) for weight in (0.0, 1.0, 2.0)]  # CE log V (+ weight x log V)
        assert losses == pytest.approx(expected, rel=1e-5), (losses, expected)


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


FUNCTIONS = torch.cat([torch.arange(50, 60), torch.full((6,), 316)]).repeat(20, 1)  # 10 tokens, then EOS


ANSWERS = [(torch.arange(5 + i % 3), torch.arange(10 + i, 18 + i)) for i in range(6)]  # (prompt, own answer)


def staged_config() -> TrainConfig:
    return small_config(
        steps=3,
        save_every=1,
        function_stage=FunctionStage(steps=2, functions=5, files=2, warmup=1),
        distill_stage=DistillStage(steps=2, answers=3, files=1, gen_length=8, block_length=4, warmup=1),
    )


def test_the_later_stages_mix_their_samples_into_the_batches_and_resume_exactly(tmp_path, monkeypatch):
    spec = tiny_spec("llada", ids={"mask": 317, "eos": 316})
    cfg = staged_config()
    assert cfg.total_steps == 7 and [start for start, _ in cfg.stages()] == [0, 3, 5]
    seen = []
    monkeypatch.setattr(trainer_module, "evaluate", lambda *args: 0.0)  # only the training batches recorded
    monkeypatch.setattr(trainer_module, "masked_diffusion_loss", recording(trainer_module.masked_diffusion_loss, seen))
    monkeypatch.setattr(
        trainer_module, "certainty_forcing_loss", recording(trainer_module.certainty_forcing_loss, seen)
    )
    straight = Trainer(spec, cfg, PATTERN, PATTERN, tmp_path / "a", FUNCTIONS)
    straight.answers = ANSWERS
    straight.train()
    # file windows; then 2 of them beside 5 EOS-padded functions; then 1 beside 3 of the model's answers
    shapes = [[len(r) for r in rows] for name, rows in seen if name == "masked_diffusion_loss"]
    assert shapes[0] == [32] * 8 and shapes[3] == [32, 32] + [16] * 5 and shapes[5] == [32]
    assert [len(rows) for name, rows in seen if name == "certainty_forcing_loss"] == [3, 3]
    assert straight.lr_at(3) == 1e-3 and straight.lr_at(5) == 1e-3 and straight.lr_at(2) < 3e-3

    def stop_after_five(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    first = Trainer(spec, cfg, PATTERN, PATTERN, tmp_path / "b", FUNCTIONS)
    first.answers = ANSWERS
    with pytest.raises(KeyboardInterrupt):
        first.train(stop_after_five)
    resumed = Trainer(spec, cfg, PATTERN, PATTERN, tmp_path / "b", FUNCTIONS)
    assert resumed.load_state() and resumed.step == 5  # at the distillation stage's start
    with pytest.raises(ValueError, match="needs the model's answers"):
        resumed.train()
    resumed.answers = ANSWERS
    resumed.train()
    for name, p in straight.params.items():
        torch.testing.assert_close(resumed.params[name], p, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no function samples"):
        Trainer(spec, cfg, PATTERN, PATTERN, tmp_path / "c")


def recording(loss, seen):
    def wrapped(spec, params, batch, *args):
        seen.append((loss.__name__, list(batch)))
        return loss(spec, params, batch, *args)

    return wrapped


def test_semi_autoregressive_masking_keeps_the_prompt_and_earlier_blocks_and_hides_later_ones():
    gen = torch.Generator().manual_seed(0)
    prompt, answer = torch.arange(3), torch.arange(10, 22)  # three blocks of 4
    for _ in range(50):
        noisy, targets, lengths = semi_autoregressive_mask([(prompt, answer)] * 2, 4, 99, gen)
        assert lengths == (15, 15)
        for row, read in zip(noisy.split(15), targets.split(15), strict=True):
            assert row[:3].tolist() == [0, 1, 2] and not read[:3].any()  # the prompt: clean, never read
            hidden, read = row[3:] == 99, read[3:]
            assert not (read & ~hidden).any()  # the loss reads masked tokens only
            if not hidden.any():
                continue
            n = int(hidden.nonzero()[0]) // 4  # the first block with a masked token
            assert not hidden[: 4 * n].any() and hidden[4 * n + 4 :].all()  # earlier blocks clean, later hidden
            assert not read[: 4 * n].any() and not read[4 * n + 4 :].any()  # one block read
            if not hidden[4 * n : 4 * n + 4].all():  # a partly masked block is the active one: all its masks read
                assert read[4 * n : 4 * n + 4].tolist() == hidden[4 * n : 4 * n + 4].tolist()


def test_function_samples_are_whole_dedented_functions_padded_with_eos():
    source = """import os

class Box:
    @property
    def size(self):
        def inner():
            return 1
        return inner()

def broken(:
"""
    assert corpus.functions(source) == []  # a file that does not parse gives none
    source = source.replace("def broken(:\n", "")
    found = corpus.functions(source)
    assert found[0].startswith("@property\ndef size(self):\n    def inner():") and "def inner():\n    return 1" in found
    assert corpus.function_heads(source) == ["@property\ndef size(self):", "def inner():"]  # the distillation's prompts
    tok = train_bpe([source * 20], "llada", 320, code=True)
    rows = function_samples(tok, [source], eos=316, window=40)
    assert len(tok.encode(found[1]).ids) < 8  # `inner` is too short to be a sample
    assert rows.shape == (1, 40) and (rows[:, -1] == 316).all()
    decoded = tok.decode([t for t in rows[0].tolist() if t != 316])
    assert decoded == found[0]
    assert len(function_samples(tok, [source], eos=316, window=9)) == 0  # none fits with its EOS


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
    # 10 file steps, 4 function steps, 3 distillation steps; then the recipe's 20 + 4 + 3: the
    # second run resumed at step 17 (and read the first run's answers back)
    assert [h["step"] for h in figures["history"]] == [10, 14, 17, 20, 24, 27]
    assert len(load_file(run / "answers.safetensors")["answers"]) == 8
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert figures["corpus"]["held_out_files"] and figures["held_out_masked_token_ce_nats"] > 0
    llm = LLM(out)
    assert llm.generate("def ", GenerationConfig(gen_length=8, steps=8, block_length=8))[0].token_ids
