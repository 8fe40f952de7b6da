"""Load a Hugging Face checkpoint: a local directory, or a hub id (`org/name`) found in the local
Hugging Face cache (downloaded there when a network is allowed): config, safetensors shards,
tokenizer, generation config.

Everything that can be checked without reading tensor data (config, file list, tensor names and
shapes in the safetensors headers) is checked before any weight is loaded. Pickle files are never read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .gguf_file import GGUFFile, GGUFReport, is_gguf
from .models import ArchSpec, ConfigError, SpecialIds, parse_config, to_config
from .models.config_keys import as_id_tuple
from .models.quantized import QuantizedWeight, check_shapes, quantize, quantize_table, quantized_names
from .models.spec import QuantScheme
from .models.weights import Weights, all_finite, check_state_dict, from_state_dict, fused_parts, row_sharded_names
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


class CheckpointError(ValueError):
    """A checkpoint directory is missing files or holds unreadable ones."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype) or name == "auto":
        return None if name == "auto" else name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; accepted: auto, {', '.join(sorted(DTYPES))}") from None


@dataclass
class Checkpoint:
    path: Path
    spec: ArchSpec
    weights: Weights
    tokenizer: Tokenizer | None
    generation_config: dict[str, Any] = field(default_factory=dict)  # generation_config.json
    model_config: dict[str, Any] = field(default_factory=dict)  # config.json as stored (a GGUF's: as read)
    name: str = ""  # what the user called it: the hub id, or the directory's name
    gguf: GGUFReport | None = None  # a GGUF file's types, and what loading kept or dequantized

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a checkpoint needs from the hub: configs, tokenizer files and safetensors; never code or pickles.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.jinja"]


def locate(model: str | Path) -> Path:
    """A checkpoint's directory: `model` itself when it exists on disk, else, for a hub id, its
    snapshot in the Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`; `HF_HUB_OFFLINE` honoured),
    fetched there first when it is missing and the network is allowed (only `HUB_FILES`)."""
    path = Path(model)
    if path.exists() or not HUB_ID.fullmatch(str(model)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (str(Path(home) / "hub") if home else None)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    for local_only in (True,) if offline else (True, False):
        try:
            found = snapshot_download(
                str(model), cache_dir=cache, local_files_only=local_only, allow_patterns=HUB_FILES
            )
            return Path(found)
        except (LocalEntryNotFoundError, HFValidationError):
            continue
        except Exception as exc:  # network, authentication, a repository that does not exist
            log.info("could not download %s: %s", model, exc)
            break
    where = cache or "the default Hugging Face cache (~/.cache/huggingface/hub)"
    raise CheckpointError(
        f"{model} is neither a directory nor a model in {where}"
        + (" (offline: HF_HUB_OFFLINE is set)" if offline else " and could not be downloaded")
        + f"; on a machine with network access run `hf download {model} --include "
        + " ".join(f"'{p}'" for p in HUB_FILES)
        + "` (or pass the checkpoint's directory)"
    )


class Description(NamedTuple):
    spec: ArchSpec
    tokenizer: Tokenizer | None
    generation_config: dict[str, Any]  # generation_config.json ({} when absent)
    model_config: dict[str, Any]  # config.json as stored


def read_spec(path: str | Path) -> Description:
    """The architecture, tokenizer and configs, without touching the weights."""
    path = locate(path)
    if path.is_file() and is_gguf(path):
        model = GGUFFile(path)
        return Description(model.spec(), model.tokenizer()[0], {}, model.config())
    if path.is_file():
        raise CheckpointError(
            f"{path} is a file but not a GGUF file: give the checkpoint's directory (the one holding config.json) "
            "or a .gguf file"
        )
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist (expected config.json and *.safetensors)")
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path} has no config.json")
    config = read_json(path / "config.json")
    generation = read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
    tokenizer = Tokenizer.from_dir(path)
    from_tok = tokenizer.special_ids() if tokenizer else SpecialIds()
    hints = SpecialIds(
        mask_token_id=generation.get("mask_token_id", from_tok.mask_token_id),
        eos_token_ids=as_id_tuple(generation.get("eos_token_id")) + from_tok.eos_token_ids,
        pad_token_id=generation.get("pad_token_id", from_tok.pad_token_id),
    )
    return Description(parse_config(config, hints), tokenizer, generation, config)


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'")
        names = list(dict.fromkeys(weight_map.values()))
        outside = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if outside:  # a shard is a file of this directory: never read anything elsewhere
            raise CheckpointError(f"{index} names shards outside the checkpoint directory: {outside[:3]}")
        files = [path / name for name in names]
        missing = [str(f.name) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" (found {', '.join(pickles)}: pickle-based weights are never loaded; convert them to safetensors)"
            if pickles
            else ""
        )
        raise CheckpointError(f"{path} has no *.safetensors weights{hint}")
    return files


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
    return shapes


def tensor_summary(files: list[Path]) -> tuple[int, int, dict[str, int]]:
    """(parameter count, bytes, tensors per stored dtype) from the safetensors headers alone."""
    count = nbytes = 0
    dtypes: dict[str, int] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    numel = math.prod(sl.get_shape())
                    dtype = sl.get_dtype()
                    count += numel
                    nbytes += numel * _DTYPE_BYTES.get(dtype, 4)
                    dtypes[dtype] = dtypes.get(dtype, 0) + 1
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file: {exc}") from exc
    return count, nbytes, dtypes


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def parse_device(device: str | torch.device) -> torch.device:
    """The device, if this machine has it; otherwise one line naming it and what is available."""
    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; available here: {', '.join(available)}") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r} is not available on this machine; available here: {', '.join(available)}")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; available here: {', '.join(available)}")
    return parsed


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse weights holding NaN or infinity (they load, then generate garbage)."""
    if not all_finite(tensor):
        raise CheckpointError(f"weight {name!r} holds NaN or infinite values: the checkpoint is damaged")


def load(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quantization: QuantScheme | None = None,
    rank_rows: tuple[int, int] | None = None,
) -> Checkpoint:
    """Read a checkpoint; with `quantization`, each linear weight is quantized as it is read (never
    a second full-precision copy of the model); with `rank_rows` = (rank, ranks), only that rank's
    rows of every tensor a tensor-parallel rank splits (`models.weights.row_sharded_names`: read
    from the file as a slice, so no rank ever holds the whole model)."""
    given, path = str(path), locate(path)
    called = given if given != str(path) and HUB_ID.fullmatch(given) else path.name
    device = parse_device(device)
    if path.is_file() and is_gguf(path):
        if rank_rows is not None:
            raise CheckpointError("a GGUF file is read whole: tensor parallel ranks need a safetensors checkpoint")
        return _load_gguf(path, parse_dtype(dtype), device, quantization)
    spec, tokenizer, generation, config = read_spec(path)
    files = shard_files(path)
    check_state_dict(spec, tensor_shapes(files))  # names and shapes before any data is read
    if quantization is not None:
        check_shapes(spec, quantization)
    quantized = quantized_names(spec, quantization) if quantization else set()
    split = row_sharded_names(spec) if rank_rows else set()
    fused = fused_parts(spec)
    target = parse_dtype(dtype)
    state: dict[str, torch.Tensor | QuantizedWeight] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name, t in _file_tensors(f, fused, split, rank_rows):
                    check_finite(name, t)
                    target = target or (t.dtype if t.is_floating_point() else None)
                    kept = t.to(device=device, dtype=target if t.is_floating_point() else t.dtype)
                    if name in quantized:
                        kept = quantize(kept, quantization)
                    elif quantization is not None and kept is t:  # a view of the mapped file, which it
                        kept = t.clone()  # would keep resident with every page read to quantize the rest
                    state[name] = kept
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} could not be read: {exc}") from exc
    weights = from_state_dict(spec, state, checked=True)  # the files' shapes were checked above
    if quantization is not None:
        spec = replace(spec, quantization=quantization)
        quantize_table(weights, quantization)
    dtype_name = weights.embed.dtype if quantization is None else f"{weights.embed.dtype}, {quantization.name}"
    log.info("loaded %s (%s, %d layers) from %s as %s", spec.family, path.name, spec.num_layers, path, dtype_name)
    return Checkpoint(path, spec, weights, tokenizer, generation, config, called)


def _file_tensors(f, fused: dict[str, list[tuple[str, int, int]]], split: set[str], rank_rows: tuple[int, int] | None):
    """(name, tensor) of each tensor of the open file `f`, a fused one as its parts; of a tensor in
    `split`, only rank_rows' (rank, ranks) 1/ranks of its rows are read."""
    for name in f.keys():
        pieces = fused.get(name) or [(name, 0, None)]
        for part, first, rows in pieces:
            if part not in split and rows is None:
                yield part, f.get_tensor(name)
                continue
            rows = f.get_slice(name).get_shape()[0] if rows is None else rows
            if part in split:
                rank, ranks = rank_rows
                first, rows = first + rank * (rows // ranks), rows // ranks
            yield part, f.get_slice(name)[first : first + rows]


def _load_gguf(path: Path, dtype: torch.dtype | None, device: torch.device, quantization: QuantScheme | None):
    model = GGUFFile(path)
    spec = model.spec()
    if quantization is not None:
        check_shapes(spec, quantization)
    tokenizer, pre = model.tokenizer()
    spec, weights, report = model.load(spec, dtype, device, quantization)
    report.pre_tokenizer = pre
    log.info("loaded %s: %s", path.name, report.describe())
    return Checkpoint(path, spec, weights, tokenizer, {}, model.config(), path.name, report)


def save(
    path: str | Path,
    spec: ArchSpec,
    state: dict[str, torch.Tensor],
    max_shard_bytes: int | None = None,
    generation_config: dict[str, Any] | None = None,
) -> None:
    """Write config.json and safetensors in the official layout, sharded with an index when asked."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    check_state_dict(spec, {k: tuple(v.shape) for k, v in state.items()})
    dtype_name = str(next(iter(state.values())).dtype).removeprefix("torch.")
    config = to_config(spec) | {"torch_dtype": dtype_name}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation_config:
        (path / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in state.items()}
    if max_shard_bytes is None:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "load", "read_spec", "save", "parse_dtype"]
