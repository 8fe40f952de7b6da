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
  is always False, as both official harnesses. `loglikelihood_rolling` (perplexity): the text in
  lm-eval's rolling windows of the context, each window's estimate given the text before it, summed.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from itertools import groupby
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .config import SETTINGS, GenerationConfig
from .decoding.likelihood import LikelihoodOptions
from .engine import LLM

log = logging.getLogger(__name__)
GENERATION_KEYS = tuple(SETTINGS)
LIKELIHOOD_KEYS = ("mc_num", "mc_batch_size", "log_type", "sampling_eps", "add_bos_token", "max_length")
# What the official scripts pass, per preset and task (a task's subtasks, e.g. mmlu_*, take its
# nearest entry; "*": every task), with each preset's source: data, in assets/eval_presets.json.
PRESET_TABLE = json.loads((Path(__file__).parent / "assets" / "eval_presets.json").read_text())
PRESETS: dict[str, dict[str, dict]] = {name: preset["tasks"] for name, preset in PRESET_TABLE.items()}


def preset_settings(preset: str | None, task: str | None) -> dict:
    """The settings `preset`'s official script passes for `task` (its own entry, else its nearest
    parent task's: mmlu for mmlu_anatomy, mmlu_pro for mmlu_pro_law), over the preset's defaults ("*")."""
    if preset is None:
        return {}
    table = PRESETS[preset]
    name = task or ""
    matches = [k for k in table if k != "*" and (name == k or name.startswith(k + "_"))]
    own = table[max(matches, key=len)] if matches else {}  # the longest name: mmlu_pro, not mmlu
    return table.get("*", {}) | own


LM_EVAL_DEFAULT_DEVICE = "cuda:0"
REQUESTS_PER_PASS = 16  # likelihood requests whose Monte Carlo copies may share forward passes
ENGINE_KEYS = ("dtype", "device", "executor", "memory_budget", "row_chunk", "max_batch", "allow_long_context")
ENGINE_KEYS += ("allow_recompute", "allow_special_tokens", "quantize", "quantize_head", "quantize_embeddings")


@register_model("mosaic")
class MosaicLM(LM):
    def __init__(
        self,
        pretrained: str | None = None,
        mc_num: int | None = None,
        mc_batch_size: int | None = None,
        likelihood_seed: int = 1234,
        log_type: str | None = None,
        sampling_eps: float | None = None,
        add_bos_token: bool | None = None,
        max_length: int | None = None,
        preset: str | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        **settings,
    ):
        """`pretrained`: a checkpoint directory or GGUF file (default: the embedded model). Engine options
        (dtype, device, executor, memory_budget, row_chunk, max_batch, allow_long_context, allow_recompute,
        allow_special_tokens, quantize, quantize_head, quantize_embeddings) and generation settings
        (config.SETTINGS) as in `LLM` and `GenerationConfig`; for the likelihood `mc_num` and
        `mc_batch_size` (the official `batch_size`), `likelihood_seed` (its generator), and Dream's
        `log_type`, `sampling_eps`,
        `add_bos_token`, `max_length` (its eval.py's arguments; its script sets add_bos_token=true).
        `preset`: llada-base, llada-instruct, dream-base or fast-dllm: per task, what the official script passes
        (`PRESETS`), under the model args given here. Contexts are the harness's own text, so
        they may carry special tokens (chat templates) unless allow_special_tokens=false.
        lm-eval's own `batch_size` / `max_batch_size` are ignored: requests batch by `max_batch`."""
        super().__init__()
        unknown = set(settings) - set(GENERATION_KEYS) - set(ENGINE_KEYS)
        if unknown:
            raise ValueError(f"unknown mosaic model_args {sorted(unknown)}; known: {GENERATION_KEYS + ENGINE_KEYS}")
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        self.preset = preset
        self.given = {"mc_num": mc_num, "mc_batch_size": mc_batch_size, "log_type": log_type}
        self.given |= {"sampling_eps": sampling_eps, "add_bos_token": add_bos_token, "max_length": max_length}
        self.given = {k: v for k, v in self.given.items() if v is not None}
        engine = {k: settings[k] for k in ENGINE_KEYS if settings.get(k) is not None}
        engine.setdefault("allow_special_tokens", True)
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
        for task in (None, *(PRESETS[preset] if preset else ())):
            self.options_for(task).check()  # bad values fail now, not at the first request
        if preset is not None:  # say what the preset passes, as the official scripts would
            for task, values in PRESETS[preset].items():
                given = {k: v for k, v in values.items() if k not in self.settings and k not in self.given}
                print(f"mosaic preset {preset}: {'other tasks' if task == '*' else task}: {given}", file=sys.stderr)
        # the official scripts seed the global generators once: the device's, and the CPU's, which
        # draws what they draw without a device (on a CPU model, one and the same)
        self.gen = torch.Generator(device=self.llm.device).manual_seed(int(likelihood_seed))
        on_cpu = self.gen.device.type == "cpu"
        self.cpu_gen = self.gen if on_cpu else torch.Generator().manual_seed(int(likelihood_seed))
        self.name = str(pretrained or "default_model")
        self.used: dict[str, dict] = {}  # per task, the settings its requests ran with (`get_model_info`)

    def get_model_info(self) -> dict:
        """What lm-eval writes into its results' config: the preset, and per task the likelihood
        options and generation settings its requests actually ran with."""
        return {"mosaic": {"model": self.name, "preset": self.preset, "settings_by_task": self.used}}

    def _ran(self, task: str | None, kind: str, values: dict) -> None:
        self.used.setdefault(task or "(no task)", {})[kind] = values

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.llm.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def options_for(self, task: str | None) -> LikelihoodOptions:
        """A likelihood request's options: the model args over the preset's for `task`, over the
        official defaults (LikelihoodOptions')."""
        preset = preset_settings(self.preset, task)
        values = {k: preset[k] for k in (*LIKELIHOOD_KEYS, "cfg_scale") if k in preset} | self.given
        if "cfg_scale" in self.settings:
            values["cfg_scale"] = self.settings["cfg_scale"]
        if "mc_batch_size" in values:
            values["batch_size"] = values.pop("mc_batch_size")
        return LikelihoodOptions(**values)

    def config_for(self, gen_kwargs: dict, task: str | None = None) -> GenerationConfig:
        """The request's settings: the model args', over the preset's for `task`, with gen_length
        from the task when unset."""
        preset = preset_settings(self.preset, task)
        settings = {k: v for k, v in preset.items() if k in GENERATION_KEYS} | self.settings
        settings.setdefault("gen_length", int(gen_kwargs.get("max_gen_toks", 256)))
        for key, value in self.llm.sampler.eval_defaults(settings["gen_length"]).items():
            settings.setdefault(key, value)
        return GenerationConfig.from_dict(settings)

    def generate_until(self, requests) -> list[str]:
        prompts, configs, stops = [], [], []
        for request in requests:
            context, gen_kwargs = request.args
            task = getattr(request, "task_name", None)
            until = gen_kwargs.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            if self.options_for(task).add_bos_token and self.llm.tokenizer.bos_text:
                context = self.llm.tokenizer.bos_text + context  # as Dream's evaluation prompts
            prompts.append(self.llm.encode(context))
            configs.append(self.config_for(gen_kwargs, task))
            self._ran(task, "generation", self.llm.resolve(configs[-1], len(prompts[-1])).given())
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
        (tokenisation included: `Sampler.encode_pair`), `REQUESTS_PER_PASS` requests at a time
        sharing forward passes (each its value alone: `Sampler.log_likelihoods`)."""
        sampler, out = self.llm.sampler, []
        with tqdm(total=len(requests), desc="mosaic likelihood") as bar:
            for first in range(0, len(requests), REQUESTS_PER_PASS):
                chunk = requests[first : first + REQUESTS_PER_PASS]
                values: list[float] = []
                for task, members in groupby(chunk, key=lambda r: getattr(r, "task_name", None)):
                    options = self.options_for(task)  # consecutive requests of one task: one set of options
                    self._ran(task, "likelihood", asdict(options))
                    pairs = [sampler.encode_pair(self.llm.tokenizer, *r.args, options) for r in members]
                    tensors = [tuple(torch.tensor(ids, dtype=torch.long) for ids in pair) for pair in pairs]
                    values += sampler.log_likelihoods(self.llm.executor, tensors, self.gen, options, self.cpu_gen)
                out += [(value, False) for value in values]
                bar.update(len(chunk))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Perplexity tasks: the text's tokens in windows of the model's context (at most
        `max_length`), as lm-eval's rolling windows (each window's prefix is the text before it,
        disjoint; the first one's is EOS), each window's Monte Carlo estimate given its prefix,
        summed: a lower bound on log p(text) (the estimators bound each window). Dream's window
        target gets EOS appended, as its likelihood appends it (its estimator never masks the
        last position, so every text token can be)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        sampler, eos, out = self.llm.sampler, self.llm.spec.eos_token_ids[0], []
        for request in tqdm(requests, desc="mosaic rolling likelihood"):
            options = self.options_for(getattr(request, "task_name", None))
            self._ran(getattr(request, "task_name", None), "rolling likelihood", asdict(options))
            # a window with its prefix token (and Dream's EOS) stays within the context
            width = min(self.llm.spec.max_position_embeddings, options.max_length) - 1 - len(sampler.window_target([]))
            tokens = self.llm.tokenizer.encode(request.args[0])
            windows = map(make_disjoint_window, get_rolling_token_windows(tokens, eos, width, 1))
            pairs = [(torch.tensor(p), torch.tensor(sampler.window_target(t))) for p, t in windows]
            out.append(sum(sampler.log_likelihoods(self.llm.executor, pairs, self.gen, options, self.cpu_gen)))
        return out


def main(argv: list[str] | None = None) -> int:
    """`mosaic eval ...`: lm-eval's command line with the `mosaic` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(argv if argv is not None else sys.argv[2:])]
    cli_evaluate()
    return 0
