"""The `mosaic` command line, run in-process."""

import json

import pytest

from mosaic_dllm.cli import main


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_generate_json(tiny_checkpoints, family, capsys):
    args = [
        "generate",
        "--model",
        str(tiny_checkpoints[family]),
        "--prompt",
        "The quick",
        "--gen-length",
        "8",
        "--steps",
        "4",
        "--seed",
        "2",
        "--json",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["family"] == family and len(record["token_ids"]) == 8 and record["forward_passes"] == 4
    assert "denoising" in captured.err  # the progress bar goes to stderr


def test_generate_plain_text_and_flags(tiny_checkpoints, capsys):
    args = [
        "generate",
        "--model",
        str(tiny_checkpoints["llada"]),
        "--prompt",
        "hi",
        "--gen-length",
        "8",
        "--block-length",
        "4",
        "--steps",
        "4",
        "--temperature",
        "0.5",
        "--cfg-scale",
        "1",
        "--remasking",
        "random",
        "--chat",
        "--dtype",
        "bf16",
        "--no-progress",
        "--stop-at-eos",
    ]
    assert main(args) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--gen-length", "10", "--block-length", "4"], "must be divisible by block_length"),
        (["--temperature", "-1"], "temperature must be >= 0"),
        (["--prompt", ""], "the prompt is empty"),
    ],
)
def test_generate_bad_input_is_a_clear_error(tiny_checkpoints, extra, message, capsys):
    args = ["generate", "--model", str(tiny_checkpoints["llada"]), "--prompt", "hi", "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_info(tiny_checkpoints, capsys):
    assert main(["info", str(tiny_checkpoints["llada_moe"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llada_moe" and info["moe"]["num_experts"] == 4 and info["parameters"] > 0
    assert info["weight_bytes"] == info["parameters"] * 4
