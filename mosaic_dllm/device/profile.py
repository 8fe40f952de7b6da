"""A device's profile: its kernel rules, measured on first use and kept on disk by fingerprint.

The fingerprint names everything the rules depend on (CPU model and flags or GPU name and compute
capability, the torch build, its BLAS and oneDNN, the instruction set it dispatches to, threads),
so a warm start reads the file; a change to any of them measures again. GEMM rules are probed per
(dtype, input width, output width) as a model first needs them and added to the file.

A profile loaded from another machine's file (`mosaic plan --profile FILE`) is not probed: a width
it lacks takes the rule of the nearest width it has, an attention rule it lacks the strictest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ..models.spec import QuantScheme
from . import probes
from .rules import AttentionRule, GemmRule, KernelRules

VERSION = 1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# The environment variables that change which kernels torch dispatches to.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
STRICTEST_ATTENTION = AttentionRule(*probes.ATTENTION_CANDIDATES[-1], copies_kv=True)


def cache_dir() -> Path:
    """Where profiles are kept: $MOSAIC_DLLM_CACHE, else the user's cache directory."""
    if root := os.environ.get("MOSAIC_DLLM_CACHE"):
        return Path(root) / "devices"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mosaic-dllm" / "devices"


def _cpu_model() -> tuple[str, str]:
    """(model name, a hash of the CPU's feature flags) from /proc/cpuinfo, where there is one."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", fields.get("Features", ""))
    return fields.get("model name", platform.machine()), hashlib.sha256(flags.encode()).hexdigest()[:16]


def fingerprint(device: torch.device) -> dict:
    """What a device's kernel rules depend on."""
    common = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return {
            "device": "cuda",
            "name": torch.cuda.get_device_name(index),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(index))),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "tf32": torch.backends.cuda.matmul.allow_tf32,
            "reduced_precision": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
            **common,
        }
    model, flags = _cpu_model()
    return {
        "device": "cpu",
        "name": model,
        "flags": flags,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "build": hashlib.sha256(torch.__config__.show().encode()).hexdigest()[:16],  # BLAS, oneDNN, ISA
        "isa_caps": {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ},
        **common,
    }


def _key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:20]


class DeviceProfile:
    """The kernel rules of one device. `rules(dtype)` is what the planner and the kernels read."""

    def __init__(self, data: dict, path: Path | None, local: bool, device: torch.device | None = None):
        self.data, self.path, self.local = data, path, local
        self.device = device or torch.device(data["fingerprint"]["device"])
        self._rules: dict[torch.dtype, KernelRules] = {}
        self._lock = threading.RLock()

    @classmethod
    def empty(cls, device: torch.device) -> DeviceProfile:
        fp = fingerprint(device)
        data = {"version": VERSION, "fingerprint": fp, "attention": {}, "gemm": {}, "silu": {}, "seconds": {}}
        return cls(data, cache_dir() / f"{_key(fp)}.json", local=True, device=device)

    @classmethod
    def load(cls, path: str | Path) -> DeviceProfile:
        """Another machine's saved profile (or this one's): read, not probed."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read a device profile from {path}: {e}") from None
        if not isinstance(data, dict) or data.get("version") != VERSION or "fingerprint" not in data:
            raise ValueError(f"{path} is not a version-{VERSION} mosaic device profile (`mosaic device --json`)")
        return cls(data, path, local=False)

    @property
    def device_type(self) -> str:
        return self.data["fingerprint"]["device"]

    @property
    def fingerprint(self) -> dict:
        return self.data["fingerprint"]

    def describe(self) -> str:
        fp = self.fingerprint
        return f"{fp['name']} ({fp['device']}, {fp.get('capability')}, torch {fp['torch']}, {fp['threads']} threads)"

    def rules(self, dtype: torch.dtype) -> KernelRules:
        with self._lock:
            if dtype not in self._rules:
                self._rules[dtype] = KernelRules(self, dtype)
            return self._rules[dtype]

    def _measured(self, table: str, key: str, probe, parse, missing):
        """The table's entry `key`: read, else probed (a local profile, then saved), else `missing()`."""
        with self._lock:
            entry = self.data[table].get(key)
            if entry is not None:
                return parse(entry)
            if not self.local:
                return missing()
            start = time.perf_counter()
            with _disable_current_modes(), torch.no_grad():  # a probe is not part of a step being measured
                result = probe()
            self.data["seconds"][f"{table} {key}"] = round(time.perf_counter() - start, 4)
            self.data[table][key] = result.as_dict()
            self.save()
            return result

    def attention_rule(self, dtype: torch.dtype) -> AttentionRule:
        return self._measured(
            "attention",
            DTYPE_NAMES[dtype],
            lambda: probes.probe_attention(dtype, self.device),
            AttentionRule.from_dict,
            lambda: STRICTEST_ATTENTION,
        )

    def gemm_rule(
        self, dtype: torch.dtype, in_width: int, out_width: int, scheme: QuantScheme | None = None
    ) -> GemmRule:
        """x @ W.T's exact calls; with `scheme`, of the quantized kernel on a weight quantized so."""
        columns = min(out_width, probes.PROBE_COLUMNS)
        kernel = f" {scheme.name}" if scheme else ""
        return self._measured(
            "gemm",
            f"{DTYPE_NAMES[dtype]} {in_width}x{columns}{kernel}",
            lambda: probes.probe_gemm(dtype, in_width, columns, self.device, scheme),
            GemmRule.from_dict,
            lambda: self._nearest("gemm", dtype, in_width, kernel),
        )

    def silu_rule(self, dtype: torch.dtype, width: int) -> GemmRule:
        return self._measured(
            "silu",
            f"{DTYPE_NAMES[dtype]} {width}",
            lambda: probes.probe_silu(dtype, width, self.device),
            GemmRule.from_dict,
            lambda: self._nearest("silu", dtype, width),
        )

    def swiglu_rule(
        self, dtype: torch.dtype, width: int, intermediate: int, scheme: QuantScheme | None = None
    ) -> GemmRule:
        """down(silu(gate(x)) * up(x)): the call sizes every one of its kernels allows."""
        parts = (
            self.gemm_rule(dtype, width, intermediate, scheme),
            self.silu_rule(dtype, intermediate),
            self.gemm_rule(dtype, intermediate, width, scheme),
        )
        return both(*parts)

    def _nearest(self, table: str, dtype: torch.dtype, width: int, kernel: str = "") -> GemmRule:
        """A foreign profile's rule for a width it lacks: that of its nearest width in the same
        dtype (and quantized kernel), else tiles of 256 rows (the largest padded call any rule makes)."""
        name = DTYPE_NAMES[dtype]
        known = [
            (k.split()[1], v)
            for k, v in self.data[table].items()
            if k.split()[0] == name and " ".join(k.split()[2:]) == kernel.strip()
        ]
        if not known:
            return GemmRule(256, False, (256,))
        _, entry = min(known, key=lambda kv: abs(int(kv[0].split("x")[0]) - width))
        return GemmRule.from_dict(entry)

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError:  # a read-only cache: the profile still holds for this process
            pass

    def probe_all(self, widths: tuple[int, ...] = (64, 256, 1024, 4096)) -> None:
        """Every dtype's attention rule and GEMM / SiLU rules at a few widths (`mosaic device`)."""
        for dtype in DTYPES.values():
            self.attention_rule(dtype)
            for width in widths:
                self.gemm_rule(dtype, width, probes.PROBE_COLUMNS)
                self.silu_rule(dtype, width)


def both(*rules: GemmRule) -> GemmRule:
    """The calls every one of `rules` allows (a free rule lists its exact tiles too)."""
    tiles = tuple(t for t in probes.TILE_CANDIDATES if all(t in r.tiles for r in rules))
    if all(r.free for r in rules):
        return GemmRule(max(r.min_rows for r in rules), True, tiles)
    return GemmRule(tiles[0] if tiles else probes.TILE_CANDIDATES[1], False, tiles)


_PROFILES: dict[str, DeviceProfile] = {}
_LOCK = threading.Lock()


def profile_for(device: torch.device | str = "cpu") -> DeviceProfile:
    """This process's profile of `device`: from the cache file for its fingerprint, else new
    (probed as rules are asked for, then saved)."""
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("a device profile is for a real device, not meta")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    fp = fingerprint(device)
    key = _key(fp)
    with _LOCK:
        if key not in _PROFILES:
            path = cache_dir() / f"{key}.json"
            profile = DeviceProfile.empty(device)
            try:
                saved = json.loads(path.read_text())
                if saved.get("version") == VERSION and saved.get("fingerprint") == fp:
                    profile = DeviceProfile(saved, path, local=True, device=device)
            except (OSError, ValueError):
                pass
            _PROFILES[key] = profile
        return _PROFILES[key]


def profile_report(profile: DeviceProfile, seconds: float, measured: bool) -> str:
    """`mosaic device`'s text: the device, where its profile is, and every rule measured."""
    lines = [
        profile.describe(),
        f"  profile   {profile.path} ({'measured now' if measured else 'read from the cache'}: {seconds:.3f} s)",
    ]
    for name, rule in sorted(profile.data["attention"].items()):
        blocks = f">= {rule['min_block']} queries from multiples of {rule['align']}" if rule["min_block"] else "none"
        copy = "copies K and V inside each call" if rule["copies_kv"] else "no K/V copy"
        lines.append(f"  attention {name}: exact query blocks {blocks}; {copy}")
    for table in ("gemm", "silu"):
        for key, rule in sorted(profile.data[table].items(), key=lambda kv: (kv[0].split()[0], _width(kv[0]))):
            calls = f"any call of >= {rule['min_rows']} rows" if rule["free"] else f"only tiles of {rule['tiles']} rows"
            lines.append(f"  {table:<9} {key:<18} exact: {calls}")
    return "\n".join(lines)


def _width(key: str) -> int:
    return int(key.split()[1].split("x")[0])
