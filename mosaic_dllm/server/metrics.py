"""Prometheus metrics of one server, in a registry of its own (several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from ..engine import LLM
from ..scheduler import BatchStats


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes: the measured side
        self.requests = Counter(
            "mosaic_requests", "Requests answered, by endpoint and HTTP status", ["endpoint", "status"], registry=r
        )
        self.rejections = Counter("mosaic_rejections", "Requests refused, by reason", ["reason"], registry=r)
        self.prompt_tokens = Counter("mosaic_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("mosaic_generated_tokens", "Tokens generated", registry=r)
        self.forward_passes = Counter(
            "mosaic_forward_passes",
            "Forward passes of finished requests (a batched step counts once per request); divided by "
            "mosaic_generated_tokens: forward passes per generated token (1 for the official samplers at "
            "steps = gen_length, less with threshold decoding)",
            registry=r,
        )
        self.queue_length = Gauge("mosaic_queue_length", "Admitted requests waiting for the engine", registry=r)
        self.step_latency = Histogram(
            "mosaic_step_latency_seconds",
            "Wall time of one denoising step",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30),
            registry=r,
        )
        self.request_latency = Histogram(
            "mosaic_request_latency_seconds", "Wall time from admission to the last token", registry=r
        )
        self.planned_bytes = Gauge(
            "mosaic_planned_activation_bytes",
            "Predicted peak activation bytes of the running batch's largest step (its plan, vs the budget)",
            registry=r,
        )
        self.batch_requests = Gauge("mosaic_batch_requests", "Requests in the running batch", registry=r)
        self.batch_sequences = Gauge(
            "mosaic_batch_sequences", "Sequences in flight (a request with guidance runs two)", registry=r
        )
        self.batch_tokens = Gauge("mosaic_batch_tokens", "Tokens in flight (every sequence's canvas)", registry=r)
        self.arena_bytes = Gauge("mosaic_arena_committed_bytes", "Arena bytes in use (0 between requests)", registry=r)
        self.budget_bytes = Gauge("mosaic_memory_budget_bytes", "Activation memory budget", registry=r)
        self.rank_rss_bytes = Gauge(
            "mosaic_rank_rss_bytes", "Across ranks: each rank's RSS after the last step", ["rank"], registry=r
        )
        self.rank_arena_bytes = Gauge(
            "mosaic_rank_arena_committed_bytes",
            "Across ranks: each rank's arena after the last step",
            ["rank"],
            registry=r,
        )

    def observe_batch(self, stats: BatchStats, llm: LLM) -> None:
        self.batch_requests.set(stats.running)
        self.batch_sequences.set(stats.sequences)
        self.batch_tokens.set(stats.tokens)
        self.planned_bytes.set(stats.planned_bytes)
        self.arena_bytes.set(llm.committed_bytes)
        for rank, memory in enumerate(llm.rank_memory):
            self.rank_rss_bytes.labels(str(rank)).set(memory["rss_bytes"])
            self.rank_arena_bytes.labels(str(rank)).set(memory["arena_committed_bytes"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
