"""Plots: per-op live-memory timelines of the executors on one chart, and peak against length."""

from __future__ import annotations

from pathlib import Path


def plot_memory(records: list[dict], timelines: dict[str, list[int]], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for executor, timeline in timelines.items():
        n = max(len(timeline) - 1, 1)
        left.plot([i / n for i in range(len(timeline))], [b / 2**30 for b in timeline], label=executor, lw=1.2)
    longest = max((r["length"] for r in records), default=0)
    left.set(
        xlabel="progress through the step (op index, normalised)",
        ylabel="live activations (GiB)",
        title=f"per-op timeline, first step, L={longest}",
    )
    left.legend()
    for executor in dict.fromkeys(r["executor"] for r in records):
        rows = sorted((r for r in records if r["executor"] == executor), key=lambda r: r["length"])
        ok = [r for r in rows if r.get("peak_activation_bytes")]
        line = right.plot(
            [r["length"] for r in ok],
            [r["peak_activation_bytes"] / 2**30 for r in ok],
            "o-",
            label=f"{executor} measured",
        )
        pred = [r for r in rows if r.get("predicted_peak_activation_bytes")]
        right.plot(
            [r["length"] for r in pred],
            [r["predicted_peak_activation_bytes"] / 2**30 for r in pred],
            "x--",
            color=line[0].get_color(),
            label=f"{executor} predicted",
        )
    right.set(xlabel="sequence length L", ylabel="peak live activations (GiB)", title="peak vs L")
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
