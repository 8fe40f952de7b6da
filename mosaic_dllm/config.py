"""Generation settings as a caller gives them: a field left None is unset, and the family's sampler
fills it the way the family's official entry point would (`Sampler.resolve`, decoding/), then
checks every setting before any heavy work.

Each setting is declared once, here, with what every reader needs (`Setting`): its help, the
families that read it, its accepted values or bounds, and its "off" value. The CLI flags, the
server's request fields, lm-eval's model args, the page's fields and the generic checks are made
from these declarations (recipe: docs/architecture.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_args, get_type_hints

# No sequence dimension beyond this (2**24 tokens): larger values are typing accidents or attacks.
MAX_LENGTH = 1 << 24
SEED_END = 2**63  # torch.Generator.manual_seed takes [0, 2**63) without wrapping

LLADA, DREAM, SDAR, LLADA2 = "llada", "dream", "sdar", "llada2"  # the samplers (LLaDA-MoE decodes as LLaDA)
FAMILY_NAMES = {LLADA: "LLaDA / LLaDA-MoE", DREAM: "Dream", SDAR: "SDAR", LLADA2: "LLaDA2.x"}
LLADA_REMASKING = ("low_confidence", "random")
SDAR_REMASKING = ("low_confidence_dynamic", "low_confidence_static", "sequential", "entropy_bounded")
REMASKING = (*LLADA_REMASKING, *SDAR_REMASKING)
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
THRESHOLD_ALG = "confidence_threshold"  # Fast-dLLM's Dream samplers
DREAM_ALGS = (*ALGS, THRESHOLD_ALG)
CACHES = ("none", "prefix", "dual")
CACHE_DTYPES = ("model", "int8", "auto")


class GenerationConfigError(ValueError):
    """Generation settings that cannot run (names the setting and the accepted values)."""


@dataclass(frozen=True)
class Setting:
    """What every reader of one generation setting needs; `name` and `kind` come from the field."""

    help: str
    families: tuple[str, ...] = (LLADA, DREAM, SDAR, LLADA2)  # the samplers that read it
    choices: tuple[str, ...] = ()
    # where families accept different choices: (family, its choices) pairs (others: `choices`)
    family_choices: tuple[tuple[str, tuple[str, ...]], ...] = ()
    low: float | None = None  # bounds: [low, high], either end open where `*_open`
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    accepted: str = ""  # how an error states the accepted values (default: from the bounds)
    off: Any = None  # the official "off" where it differs from unset: a JSON null means it
    neutral: Any = None  # a value a family that does not read it takes as a no-op (default: `off`)
    api_name: str = ""  # the OpenAI field's name where it differs (max_tokens)
    name: str = ""
    kind: type = object

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def field_name(self) -> str:
        return self.api_name or self.name

    def choices_for(self, family: str) -> tuple[str, ...]:
        """The choices a `family`'s sampler accepts."""
        return dict(self.family_choices).get(family, self.choices)

    @property
    def no_op(self) -> Any:
        return self.off if self.neutral is None else self.neutral

    def describe(self) -> str:
        """The accepted values, as an error or a help text states them."""
        if self.accepted:
            return self.accepted
        if self.choices:
            return f"one of {self.choices}"
        if self.kind is int and self.low == 1:
            return "a positive integer"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return "true or false" if self.kind is bool else f"a {self.kind.__name__}"

    def check(self, value: Any, label: str = "") -> None:
        """Raise GenerationConfigError unless `value` (not None) is of the setting's kind and within
        its bounds or choices; the error names it `label` (default: the setting's name)."""

        def fail(what: str) -> None:
            raise GenerationConfigError(f"{label or self.name} must be {what}, got {value!r}")

        if self.kind is bool:
            if not isinstance(value, bool):
                fail("true or false")
            return
        if self.kind is str:
            if value not in self.choices:
                fail(f"one of {self.choices}")
            return
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else int | float):
            fail("an integer" if self.kind is int else "a number")
        if isinstance(value, float) and not math.isfinite(value):
            fail("a finite number")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if self.kind is int and self.low == 1 and self.high == MAX_LENGTH and not below and value > self.high:
            fail(f"at most {MAX_LENGTH}")
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            fail(self.describe())


def setting(help: str, **meta: Any) -> Any:
    """A GenerationConfig field (default None: unset) carrying its `Setting`."""
    default = meta.pop("default", None)
    return field(default=default, metadata={"setting": Setting(help, **meta)})


LENGTH = dict(low=1, high=MAX_LENGTH)
FAST_DLLM = "Fast-dLLM's parallel decoding (opt-in; an approximation of the official sampler, exact to Fast-dLLM)"


@dataclass(frozen=True)
class GenerationConfig:
    gen_length: int | None = setting("tokens to generate (the generation length)", api_name="max_tokens", **LENGTH)
    steps: int | None = setting("denoising steps (SDAR, LLaDA2.x: per block)", **LENGTH)
    block_length: int | None = setting(
        "semi-autoregressive block (LLaDA; Dream with a block cache; SDAR, LLaDA2.x: its attention's blocks)",
        **LENGTH,
    )
    # LLaDA's float64 Gumbel noise, (-log u) ** temperature, underflows to 0 for some draws past ~20
    temperature: float | None = setting("sampling temperature (0: greedy)", low=0, high=10)
    cfg_scale: float | None = setting(
        "classifier-free guidance scale (Dream's official sampler has no classifier-free guidance)",
        families=(LLADA,),
        low=0,
        high=100,
        neutral=0.0,
    )
    remasking: str | None = setting(
        f"which masked positions a step reveals (LLaDA: {' / '.join(LLADA_REMASKING)}; "
        f"SDAR: {' / '.join(SDAR_REMASKING)})",
        families=(LLADA, SDAR),
        choices=REMASKING,
        family_choices=((LLADA, LLADA_REMASKING), (SDAR, SDAR_REMASKING)),
        neutral="low_confidence",
    )
    alg: str | None = setting("how a step ranks masked positions", families=(DREAM,), choices=DREAM_ALGS)
    alg_temp: float | None = setting(
        "sample positions at this temperature instead of taking the top ones (0: off)",
        families=(DREAM,),
        low=0,
        high=100,
        off=0.0,
    )
    top_p: float | None = setting(
        "nucleus sampling (1: off)", families=(DREAM, SDAR, LLADA2), low=0, low_open=True, high=1, off=1.0
    )
    top_k: int | None = setting(
        "keep the k most likely tokens (0: off)",
        families=(DREAM, SDAR, LLADA2),
        low=0,
        accepted="a positive integer, or 0 for no top-k",
        off=0,
    )
    eps: float | None = setting("the final timestep", families=(DREAM,), low=0, low_open=True, high=1, high_open=True)
    threshold: float | None = setting(
        f"reveal every masked position of the block at or above this confidence, at least one a step. {FAST_DLLM}"
        " (SDAR: low_confidence_dynamic's confidence threshold; LLaDA2.x: its official decoding's threshold)",
        low=0,
        low_open=True,
        high=1,
    )
    eb_threshold: float | None = setting(
        "entropy_bounded: reveal the least uncertain masked positions while their entropies sum to at most this",
        families=(SDAR,),
        low=0,
        low_open=True,
    )
    minimal_topk: int | None = setting(
        "LLaDA2.x: steps a block are at most gen_length / minimal_topk", families=(LLADA2,), **LENGTH
    )
    editing_threshold: float | None = setting(
        "LLaDA2.1's token editing (its decoding; unset: LLaDA2.0's): a revealed answer token of the block is "
        "replaced when a step's new token differs and its confidence is above this",
        families=(LLADA2,),
        low=0,
        high=1,
    )
    max_post_steps: int | None = setting(
        "LLaDA2.1: editing steps a block may take once none of its positions is masked",
        families=(LLADA2,),
        low=0,
        high=MAX_LENGTH,
        accepted="an integer >= 0",
    )
    num_to_transfer: int | None = setting(
        "LLaDA2.1: masked positions a step reveals at least (the most confident)", families=(LLADA2,), **LENGTH
    )
    factor: float | None = setting(
        f"the factor-based variant of threshold (Fast-dLLM's Dream samplers have threshold only). {FAST_DLLM}",
        families=(LLADA,),
        low=0,
        low_open=True,
    )
    cache: str | None = setting(
        "block K/V cache: the prompt's and finished blocks' K/V (prefix), also the later blocks' (dual). " + FAST_DLLM,
        families=(LLADA, DREAM),
        choices=CACHES,
        neutral="none",
    )
    cache_dtype: str | None = setting(
        "the block cache's precision: the model's dtype, int8 (a scale per position and head: about half "
        "a bf16 cache; an approximation) or auto (int8 only when the model's would not fit the memory budget); "
        "SDAR: its K/V cache",
        families=(LLADA, DREAM, SDAR),
        choices=CACHE_DTYPES,
        neutral="model",
    )
    # LLaDA-Instruct's evaluation settings (its paper's Appendix B.4; official generate.py)
    logits_eos_inf: bool | None = setting(
        "never generate EOS: its logit is -inf before the token is chosen", families=(LLADA,), neutral=False
    )
    confidence_eos_eot_inf: bool | None = setting(
        "rank EOS and end-of-turn answers last: their probability is 0 in the confidence (EOS only at "
        "temperature 0, as the official code's aliasing does)",
        families=(LLADA,),
        neutral=False,
    )
    seed: int | None = setting("random seed", default=0, low=0, high=SEED_END, high_open=True, accepted="in [0, 2**63)")
    stop_at_eos: bool = setting(
        "finish once the text before the first EOS can no longer change (LLaDA2.x: its eos_early_stop)",
        default=False,
        neutral=False,
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationConfig:
        unknown = sorted(set(values) - set(SETTINGS))
        if unknown:
            raise GenerationConfigError(f"unknown generation settings {unknown}; accepted: {sorted(SETTINGS)}")
        return cls(**values)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // (self.block_length or self.gen_length)

    @property
    def parallel(self) -> bool:
        """Fast-dLLM's decoding (threshold, factor or a block cache) rather than the official sampler."""
        return self.threshold is not None or self.factor is not None or self.cache not in (None, "none")

    @property
    def most_steps(self) -> int:
        """The steps a generation can take: `steps`, or with a threshold (or factor) one token a step."""
        return self.gen_length if self.threshold is not None or self.factor is not None else self.steps

    def unset(self, **defaults: Any) -> GenerationConfig:
        """The settings with every unset (None) field in `defaults` filled from it."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def given(self) -> dict[str, Any]:
        """The settings the caller set."""
        return {name: getattr(self, name) for name in SETTINGS if getattr(self, name) is not None}

    def check_common(self, family: str) -> None:
        """What every sampler needs: every setting of its kind and within its bounds or choices (the
        family's own, where they differ),
        gen_length and steps set, threshold and factor not both, and no setting the `family`'s
        sampler does not read (other than its no-op value); raises GenerationConfigError."""
        for name, s in SETTINGS.items():
            value = getattr(self, name)
            if value is not None:
                s.check(value)
            if value is not None and family in s.families and s.choices and value not in s.choices_for(family):
                raise GenerationConfigError(
                    f"{name} must be one of {s.choices_for(family)} for a {FAMILY_NAMES[family]} model, got {value!r}"
                )
        for name in ("gen_length", "steps"):
            if getattr(self, name) is None:
                raise GenerationConfigError(f"{name} must be {SETTINGS[name].describe()}, got None")
        if self.threshold is not None and self.factor is not None:
            raise GenerationConfigError(
                "set threshold or factor, not both (factor is Fast-dLLM's variant of threshold)"
            )
        optional_cache = family in SETTINGS["cache"].families  # block diffusion always keeps one
        if self.cache_dtype not in (None, "model") and optional_cache and self.cache in (None, "none"):
            raise GenerationConfigError(f"cache_dtype {self.cache_dtype} needs a block cache: set cache prefix or dual")
        foreign = [
            n for n, s in SETTINGS.items() if family not in s.families and getattr(self, n) not in (None, s.no_op)
        ]
        if foreign:
            readers = " / ".join(FAMILY_NAMES[f] for f in sorted({f for n in foreign for f in SETTINGS[n].families}))
            helps = "; ".join(f"{n}: {SETTINGS[n].help}" for n in foreign)
            raise GenerationConfigError(
                f"{foreign} apply to {readers} only, not to a {FAMILY_NAMES[family]} model ({helps})"
            )


def check_stored(values: dict[str, Any], source: str, aliases: dict[str, str] | None = None) -> None:
    """Settings a checkpoint file stores (`source`: config.json, generation_config.json) checked as
    a caller's would be, before any request: GenerationConfigError naming the file and the key.
    `aliases`: stored names of settings (max_new_tokens for gen_length)."""
    names = {n: n for n in SETTINGS} | (aliases or {})
    for key, value in values.items():
        if key in names and value is not None:
            SETTINGS[names[key]].check(value, label=f"{source}: '{key}'")


def _settings() -> dict[str, Setting]:
    hints = get_type_hints(GenerationConfig)
    out = {}
    for f in fields(GenerationConfig):
        kind = next(t for t in (*get_args(hints[f.name]), hints[f.name]) if t is not type(None))
        out[f.name] = replace(f.metadata["setting"], name=f.name, kind=kind)
    return out


SETTINGS: dict[str, Setting] = _settings()
# The official code's None ("off") where it differs from unset: a JSON null means this value.
OFF = {name: s.off for name, s in SETTINGS.items() if s.off is not None}
