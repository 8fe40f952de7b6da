"""lm-evaluation-harness model `mosaic`: generation and likelihood through the engine.

    mosaic eval --model mosaic --model_args pretrained=DIR,gen_length=256,steps=256,block_length=32 \\
        --tasks gsm8k --num_fewshot 5

`mosaic eval` registers the model and hands its arguments to lm-eval's own command line
(lm-eval has no plugin discovery for models); from Python, `import mosaic_dllm.evaluation` registers
it for `lm_eval.simple_evaluate(model="mosaic", ...)`. Needs the `eval` extra (`lm-eval`).

- `generate_until`: every request of a call runs batched through `LLM.generate` (each answer as
  alone). gen_length: `gen_length` from the model args, else the task's `max_gen_toks`, else 256;
  LLaDA's steps default to gen_length and block_length to gen_length unless given (the official
  sampler's defaults for a call that names only the length). The answer is cut at the first stop
  sequence; special tokens are dropped. Chat templates come from the checkpoint's tokenizer
  (`--apply_chat_template`).
- `loglikelihood`: each family's official Monte Carlo estimate (`decoding/likelihood.py`): LLaDA's
  (`mc_num` samples, `mc_batch_size` per pass (the official `batch_size`), `cfg_scale`) and
  Dream's (HKUNLP/Dream `eval/eval.py`: `log_type` ftb / btf / union, `sampling_eps`,
  `add_bos_token`, `max_length`; no guidance: its upstream branch is broken), one generator
  seeded with `likelihood_seed` for the whole run as the official scripts seed the global one;
  the context/continuation split as each official harness (`Sampler.encode_pair`). `isgreedy`
  is always False, as both official harnesses. `loglikelihood_rolling`: refused, as the official
  harnesses.
"""

from __future__ import annotations

import logging
import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .config import SETTINGS, GenerationConfig
from .decoding.likelihood import LikelihoodOptions
from .engine import LLM

log = logging.getLogger(__name__)
GENERATION_KEYS = tuple(SETTINGS)
LM_EVAL_DEFAULT_DEVICE = "cuda:0"
ENGINE_KEYS = ("dtype", "device", "executor", "memory_budget", "row_chunk", "max_batch", "allow_long_context")
ENGINE_KEYS += ("allow_recompute", "allow_special_tokens")


@register_model("mosaic")
class MosaicLM(LM):
    def __init__(
        self,
        pretrained: str | None = None,
        mc_num: int = 128,
        mc_batch_size: int = 32,
        likelihood_seed: int = 1234,
        log_type: str = "ftb",
        sampling_eps: float = 1e-3,
        add_bos_token: bool = False,
        max_length: int = 2048,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        **settings,
    ):
        """`pretrained`: a checkpoint directory (default: the embedded model). Engine options
        (dtype, device, executor, memory_budget, row_chunk, max_batch, allow_long_context, allow_recompute,
        allow_special_tokens) and generation settings (config.SETTINGS) as in `LLM` and
        `GenerationConfig`; for the likelihood `mc_num` and `mc_batch_size` (the official
        `batch_size`), `likelihood_seed` (its generator), and Dream's `log_type`, `sampling_eps`,
        `add_bos_token`, `max_length` (its eval.py's arguments; its script sets add_bos_token=true).
        lm-eval's own `batch_size` / `max_batch_size` are ignored: requests batch by `max_batch`."""
        super().__init__()
        unknown = set(settings) - set(GENERATION_KEYS) - set(ENGINE_KEYS)
        if unknown:
            raise ValueError(f"unknown mosaic model_args {sorted(unknown)}; known: {GENERATION_KEYS + ENGINE_KEYS}")
        engine = {k: settings[k] for k in ENGINE_KEYS if settings.get(k) is not None}
        device = str(engine.get("device", "cpu"))
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes its default, cuda:0, when --device is not given: no warning for that one
            log.log(
                logging.INFO if device == LM_EVAL_DEFAULT_DEVICE else logging.WARNING,
                "mosaic: device %s is not available here; running on cpu",
                device,
            )
            engine["device"] = "cpu"
        self.llm = LLM(pretrained, **engine)
        self.settings = {k: settings[k] for k in GENERATION_KEYS if settings.get(k) is not None}
        self.likelihood = LikelihoodOptions(
            int(mc_num),
            int(mc_batch_size),
            float(self.settings.get("cfg_scale", 0.0)),
            str(log_type),
            float(sampling_eps),
            bool(add_bos_token),
            int(max_length),
        )
        self.likelihood.check()
        self.gen = torch.Generator(device=self.llm.device).manual_seed(int(likelihood_seed))
        self.name = str(pretrained or "default_model")

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.llm.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def config_for(self, gen_kwargs: dict) -> GenerationConfig:
        """The request's settings: the model args', with gen_length from the task when unset."""
        settings = dict(self.settings)
        settings.setdefault("gen_length", int(gen_kwargs.get("max_gen_toks", 256)))
        for key, value in self.llm.sampler.eval_defaults(settings["gen_length"]).items():
            settings.setdefault(key, value)
        return GenerationConfig.from_dict(settings)

    def generate_until(self, requests) -> list[str]:
        prompts, configs, stops = [], [], []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            prompts.append(self.llm.encode(context))
            configs.append(self.config_for(gen_kwargs))
        answers: list[str] = [""] * len(prompts)
        done = self.llm.stream(prompts, configs)  # batched; the bar moves as each request finishes
        for i, out in tqdm(done, total=len(prompts), desc="mosaic generate"):
            text = out.text
            for stop in stops[i]:
                if stop and stop in text:
                    text = text.split(stop)[0]
            answers[i] = text
        return answers

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Each request's Monte Carlo estimate as its family's official evaluation computes it
        (tokenisation included: `Sampler.encode_pair`, `Sampler.log_likelihood`)."""
        sampler, out = self.llm.sampler, []
        for request in tqdm(requests, desc="mosaic likelihood"):
            pair = sampler.encode_pair(self.llm.tokenizer, *request.args, self.likelihood)
            prefix, target = (torch.tensor(ids, dtype=torch.long) for ids in pair)
            out.append((sampler.log_likelihood(self.llm.executor, prefix, target, self.gen, self.likelihood), False))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError(
            "mosaic: rolling log-likelihood (perplexity tasks) is not implemented, as in LLaDA's harness"
        )


def main(argv: list[str] | None = None) -> int:
    """`mosaic eval ...`: lm-eval's command line with the `mosaic` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(argv if argv is not None else sys.argv[2:])]
    cli_evaluate()
    return 0
