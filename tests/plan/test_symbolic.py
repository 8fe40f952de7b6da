"""Sizes as expressions: one trace per structure, evaluated for any shape, equal to a plain trace."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_dllm.bench.presets import preset
from mosaic_dllm.device import profile_for
from mosaic_dllm.models.groups import Chunks
from mosaic_dllm.plan import symbolic
from mosaic_dllm.plan.shapes import StepShape
from mosaic_dllm.plan.symbolic import Monomial, StepTracer, structure
from mosaic_dllm.plan.trace import trace_step
from tests.tiny import tiny_spec

SPECS = {name: preset(name, layers=2) for name in ("llada-8b", "dream-7b", "llada-moe-7b")}
SPECS |= {f"tiny-{f}": tiny_spec(f, ids={"mask": 317, "eos": 316}) for f in ("llada", "dream", "llada_moe")}
RULES = profile_for("cpu").rules(torch.bfloat16)
TRACERS = {name: StepTracer(spec, torch.bfloat16, RULES) for name, spec in SPECS.items()}


def test_factoring_recovers_constant_and_powers():
    sentinels = (1_000_003, 10_007, 10_009)
    m = Monomial.factor(3 * 4096 * 1_000_003 * 10_009**2, sentinels)
    assert m == Monomial(3 * 4096, (1, 0, 2))
    assert m.at([5, 7, 11]) == 3 * 4096 * 5 * 11**2


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(sorted(SPECS)),
    batch=st.integers(1, 2),
    length=st.integers(2, 5000),
    rows=st.integers(1, 64),
    chunks=st.tuples(*(st.integers(1, 9) for _ in range(4))),
    sampler=st.integers(0, 10**6),
)
def test_evaluated_graphs_equal_plain_traces(name, batch, length, rows, chunks, sampler):
    shape = StepShape.of(batch, length, rows, Chunks(*chunks), sampler)
    tracer = TRACERS[name]
    graph = tracer.graph(shape)
    assert tracer.is_symbolic(shape), "every size in these models is a product of the step's symbols"
    assert graph == trace_step(SPECS[name], torch.bfloat16, shape)


def test_a_structure_whose_evaluation_disagrees_is_traced_shape_by_shape(monkeypatch):
    spec = SPECS["tiny-llada"]
    real = symbolic.symbolic_trace

    def wrong(*args):
        step = real(*args)
        step.dims[0] = tuple(Monomial(d.const + 1, d.powers) for d in step.dims[0])
        return step

    monkeypatch.setattr(symbolic, "symbolic_trace", wrong)
    tracer = StepTracer(spec, torch.bfloat16, RULES)
    shape = StepShape.of(1, 50, 8)
    assert tracer.graph(shape) == trace_step(spec, torch.bfloat16, shape)
    assert not tracer.is_symbolic(shape)
    other = StepShape.of(1, 70, 8)
    assert structure(other) == structure(shape)
    assert tracer.graph(other) == trace_step(spec, torch.bfloat16, other)
