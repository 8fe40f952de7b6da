"""mosaic-dllm: memory-efficient inference for diffusion language models (LLaDA, Dream, LLaDA-MoE)."""

from .config import GenerationConfig, GenerationConfigError
from .decoding.common import GenerationCancelled, StepEvent
from .engine import LLM, DoesNotFit, GenerationOutput, PromptError

__all__ = [
    "LLM",
    "DoesNotFit",
    "GenerationConfig",
    "GenerationConfigError",
    "GenerationOutput",
    "GenerationCancelled",
    "PromptError",
    "StepEvent",
]
__version__ = "0.1.0"
