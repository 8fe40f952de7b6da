"""Loading checkpoint directories, and every way a directory can be wrong."""

import json
import shutil

import pytest
import torch

from mosaic_dllm import checkpoint
from mosaic_dllm.checkpoint import CheckpointError
from mosaic_dllm.models import ConfigError, parse_config
from mosaic_dllm.models.weights import WeightMismatchError
from tests.conftest import FAMILIES


@pytest.fixture
def copy_of(tiny_checkpoints, tmp_path):
    def make(family):
        dst = tmp_path / family
        shutil.copytree(tiny_checkpoints[family], dst)
        return dst

    return make


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [None, "bf16", "fp16", "fp32"])
def test_loads_each_family_as_stored_or_as_asked(tiny_checkpoints, family, dtype):
    ck = checkpoint.load(tiny_checkpoints[family], dtype=dtype)
    assert ck.spec.family == {"sdar_moe": "sdar"}.get(family, family)  # SDAR-MoE is SDAR with MoE layers
    expected = {None: torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    assert all(t.dtype == expected for t in ck.weights.tensors())


def test_sharded_and_unsharded_give_the_same_weights(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file

    from mosaic_dllm.models.weights import expected_shapes

    ck = checkpoint.load(tiny_checkpoints["llada"])
    state = load_file(str(tiny_checkpoints["llada"] / "model.safetensors"))
    checkpoint.save(tmp_path, ck.spec, state, max_shard_bytes=30_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    shutil.copy(tiny_checkpoints["llada"] / "tokenizer.json", tmp_path)
    sharded = checkpoint.load(tmp_path)
    assert set(expected_shapes(ck.spec)) == set(state)
    for a, b in zip(ck.weights.tensors(), sharded.weights.tensors(), strict=True):
        assert torch.equal(a, b)


def test_special_ids_come_from_the_checkpoint(tiny_checkpoints):
    moe = checkpoint.load(tiny_checkpoints["llada_moe"])
    config = json.loads((tiny_checkpoints["llada_moe"] / "config.json").read_text())
    assert "mask_token_id" not in config  # LLaDA-MoE: the mask id comes from the tokenizer
    assert moe.tokenizer.id_to_token(moe.spec.mask_token_id) == "<|mdm_mask|>"
    dream = checkpoint.load(tiny_checkpoints["dream"])
    assert dream.tokenizer.id_to_token(dream.spec.mask_token_id) == "<|mask|>"
    assert dream.tokenizer.id_to_token(dream.spec.eos_token_ids[0]) == "<|endoftext|>"


def test_llada_moe_recognised_by_architecture_or_expert_keys(tiny_checkpoints):
    config = json.loads((tiny_checkpoints["llada_moe"] / "config.json").read_text())
    assert parse_config(config | {"model_type": "llada", "mask_token_id": 3}).family == "llada_moe"
    no_arch = {k: v for k, v in config.items() if k != "architectures"} | {"mask_token_id": 3}
    assert parse_config(no_arch).family == "llada_moe"


def test_missing_directory_and_files(tmp_path, copy_of):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint.load(tmp_path)
    path = copy_of("llada")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle-based weights are never loaded"):
        checkpoint.load(path)


def test_corrupt_files(copy_of):
    path = copy_of("llada")
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        checkpoint.load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(path)


def test_missing_shard_named_by_index(copy_of):
    path = copy_of("dream")
    next(path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing: model-00002"):
        checkpoint.load(path)


def test_unknown_family_and_bad_config_values(copy_of):
    path = copy_of("dream")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="unknown model family.*GPT2LMHeadModel.*supported: LLaDA"):
        checkpoint.load(path)
    for bad, message in [
        ({"hidden_size": 0}, "positive"),
        ({"num_hidden_layers": "2"}, "must be an integer"),
        ({"rope_scaling": {"type": "yarn"}}, "not supported"),
        ({"num_key_value_heads": 3}, "multiple"),
        ({"rms_norm_eps": -1e-6}, "'rms_norm_eps' must be positive"),
        ({"rms_norm_eps": "1e-6"}, "'rms_norm_eps' must be a finite number"),
        ({"max_position_embeddings": 4096.5}, "'max_position_embeddings' must be an integer"),
        ({"rope_theta": 1e999}, "'rope_theta' must be a finite number"),
        ({"eos_token_id": "151643"}, "token id must be an integer"),
        ({"mask_token_id": [1, 2]}, "one id each"),
    ]:
        (path / "config.json").write_text(json.dumps(config | bad))
        with pytest.raises(ConfigError, match=message):
            checkpoint.load(path)
    del config["hidden_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="lacks the required key 'hidden_size'"):
        checkpoint.load(path)


def test_weights_that_do_not_match_the_config_are_listed(copy_of):
    path = copy_of("llada")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"n_layers": 3, "mlp_hidden_size": 96}))
    with pytest.raises(WeightMismatchError) as err:
        checkpoint.load(path)
    text = str(err.value)
    assert "missing (9)" in text and "model.transformer.blocks.2.q_proj.weight" in text
    assert "wrong shape" in text and "blocks.0.ff_proj.weight: checkpoint (128, 64), config expects (96, 64)" in text


def test_unexpected_tensor_listed(copy_of):
    from safetensors.torch import load_file, save_file

    path = copy_of("llada")
    state = load_file(str(path / "model.safetensors"))
    state["model.transformer.extra.weight"] = torch.zeros(2)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(WeightMismatchError, match="unexpected \\(1\\): model.transformer.extra.weight"):
        checkpoint.load(path)


def test_bad_dtype_name():
    with pytest.raises(ValueError, match="unknown dtype 'int4'; accepted: auto"):
        checkpoint.parse_dtype("int4")


def test_a_checkpoint_is_read_only_from_its_own_directory(copy_of, tmp_path):
    """An index naming a shard elsewhere is refused before anything is read; a file given as the
    checkpoint (not a GGUF file) is named as a file."""
    path = copy_of("dream")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"")
    for name in ("../elsewhere.safetensors", str(outside), "sub/model.safetensors"):
        first = next(iter(index["weight_map"]))
        bad = index | {"weight_map": index["weight_map"] | {first: name}}
        (path / "model.safetensors.index.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
            checkpoint.load(path)
    with pytest.raises(CheckpointError, match="is a file but not a GGUF file: give the checkpoint.s directory"):
        checkpoint.load(path / "config.json")


@pytest.mark.parametrize(
    "family,file,values,message",
    [
        ("llada", "generation_config.json", {"steps": "many"}, "generation_config.json: 'steps' must be"),
        ("llada", "generation_config.json", {"temperature": -1}, "'temperature' must be in \\[0, 10\\]"),
        ("llada", "generation_config.json", {"max_new_tokens": 2.5}, "'max_new_tokens' must be an integer"),
        ("dream", "config.json", {"eps": -0.1}, "config.json: 'eps' must be in"),
        ("dream", "config.json", {"alg": "best"}, "'alg' must be one of"),
        ("dream", "config.json", {"top_k": "50"}, "'top_k' must be an integer"),
    ],
)
def test_stored_generation_settings_are_checked_at_load(copy_of, family, file, values, message):
    """A checkpoint's own defaults are refused when it loads (a server never starts with them and
    then answers every request with an error)."""
    from mosaic_dllm import LLM, GenerationConfigError

    path = copy_of(family)
    stored = json.loads((path / file).read_text()) if (path / file).exists() else {}
    (path / file).write_text(json.dumps(stored | values))
    with pytest.raises(GenerationConfigError, match=message):
        LLM(path)
