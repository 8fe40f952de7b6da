"""The op graph traced from the model description: every activation, lifetimes, the layer template."""

from dataclasses import replace

import pytest
import torch

from mosaic_dllm.bench.presets import preset
from mosaic_dllm.models.groups import BY_NAME
from mosaic_dllm.plan.shapes import StepShape, chunk_bucket
from mosaic_dllm.plan.step_plan import plan_step
from mosaic_dllm.plan.trace import trace_step
from tests.tiny import tiny_spec

IDS = {"mask": 317, "eos": 316}


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_every_op_is_named_grouped_and_buffers_live_within_the_step(family):
    spec = tiny_spec(family, ids=IDS)
    graph = trace_step(spec, torch.bfloat16, StepShape.of(2, 50, 8))
    assert graph.ops[0] == "embed" and graph.ops[-1] == "lm_head"
    assert len(graph.groups) == len(graph.ops) and set(graph.groups) <= set(BY_NAME)  # every op grouped
    for b in graph.buffers:
        assert 0 <= b.op <= b.last < len(graph.ops)
    residual = graph.buffers[0]  # the embedding output becomes the residual stream, updated in place
    assert residual.shape == (1, 100, spec.hidden_size) and graph.ops[residual.last] == "final_norm"
    logits = graph.buffers[-1]
    assert logits.shape == (2 * 8, spec.vocab_size) and logits.dtype == torch.bfloat16
    assert not any(b.shape[-1] == spec.vocab_size and b.shape[1] == 50 for b in graph.buffers)  # no L x V


def test_uniform_layers_are_traced_once_and_the_template_maps_every_layer():
    spec = replace(tiny_spec("llada", ids=IDS), num_layers=5)
    graph = trace_step(spec, torch.float32, StepShape.of(1, 33, 4))
    assert graph.repeats == 5
    one_layer = trace_step(replace(spec, num_layers=1), torch.float32, StepShape.of(1, 33, 4))
    assert len(graph.buffers) == len(one_layer.buffers)
    assert graph.allocations_per_step == graph.prefix_allocs + 5 * graph.template_allocs + (
        len(graph.buffers) - graph.prefix_allocs - graph.template_allocs
    )
    p, k = graph.prefix_allocs, graph.template_allocs
    assert [graph.template_index(a) for a in (0, p, p + k, p + 4 * k + 1)] == [0, p, p, p + 1]
    assert graph.template_index(graph.allocations_per_step - 1) == len(graph.buffers) - 1
    # The rotary tables are written before the layer and read in it: they live through the template.
    first, last = graph.template_ops
    tables = [b for b in graph.buffers if graph.ops[b.op] == "rotary_tables" and b.last >= first]
    assert tables and all(b.last >= last for b in tables)


def test_mixed_dense_and_moe_layers_are_traced_layer_by_layer():
    spec = tiny_spec("llada_moe", ids=IDS)
    assert len(set(spec.moe.moe_layers)) == 2  # the tiny MoE has a dense first layer
    assert trace_step(spec, torch.bfloat16, StepShape.of(1, 20, 4)).repeats == 1


def test_chunk_buckets_are_powers_of_two_capped_by_the_row_chunk():
    assert [chunk_bucket(n, 64) for n in (1, 2, 3, 5, 33, 64, 65, 1000)] == [1, 2, 4, 8, 64, 64, 64, 64]
    with pytest.raises(ValueError, match="at least one row"):
        chunk_bucket(0, 64)


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
@pytest.mark.parametrize("length", [17, 64, 301])
def test_step_plans_are_valid_and_close_to_the_lower_bound(family, length):
    """Tiny models have many buffers of similar size: greedy offsets may leave gaps of ~10%."""
    plan = plan_step(tiny_spec(family, ids=IDS), torch.bfloat16, StepShape.of(1, length, 16), check=True)
    assert plan.lower_bound_bytes <= plan.arena_bytes <= 1.15 * plan.lower_bound_bytes
    assert plan.predicted_peak_bytes == plan.arena_bytes + plan.workspace_bytes
    summary = plan.summary()
    assert summary["length"] == length and summary["peak_group"] in set(BY_NAME)


@pytest.mark.parametrize("name", ["llada-8b", "dream-7b", "llada-moe-7b"])
@pytest.mark.parametrize("length", [1024, 2048, 4096])
def test_real_dimensions_plan_within_five_percent_of_the_lower_bound(name, length):
    plan = plan_step(preset(name, layers=2), torch.bfloat16, StepShape.of(1, length, 64))
    assert plan.arena_bytes <= 1.05 * plan.lower_bound_bytes
