"""Memory and latency instruments: one denoising step measured (live tensors, peak RSS, time) or predicted."""
