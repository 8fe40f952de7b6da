"""The device a step runs on, as the planner and the kernels must know it: which call sizes keep a
row's bits, which attention query blocks do, what kernels allocate inside. Measured, not assumed."""

from .profile import DeviceProfile, cache_dir, fingerprint, profile_for, profile_report
from .rules import AttentionRule, GemmRule, KernelRules

__all__ = [
    "AttentionRule",
    "DeviceProfile",
    "GemmRule",
    "KernelRules",
    "cache_dir",
    "fingerprint",
    "profile_for",
    "profile_report",
]
