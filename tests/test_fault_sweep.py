"""Every category of bad input gets one clear error, on a real `mosaic serve` and the CLI; valid
input in the same sweep runs. (`python -m tests.fault_sweep` runs every CLI case too.)"""

import pytest

from tests.fault_sweep import CLEAR, CLI_CASES, CRASH, HTTP_CASES, OK, REFUSED, SILENT, sweep, table

# CLI cases that fail before a model loads (each CLI case is a process: the full list runs in the sweep)
FAST_CLI = {
    "seed beyond 64 bits",
    "cuda without a GPU",
    "unknown device",
    "invalid UTF-8 prompt",
    "serve on a taken port",
    "train over the shipped model",
    "bench lengths abc",
    "serve with a 10-byte body limit",
    "plan budget 1e999GiB",
    "plan rows past the length",
    "plan zero layers",
    "bench max-len budget 0",
    "serve with 0 connections",
    "serve with a negative header timeout",
    "quantize the head of unquantized weights",
    "a GGUF file that is not one",
    "a parallel executor on one process",
    "serve across ranks",
}


@pytest.mark.slow
def test_no_traceback_no_500_nothing_silently_accepted():
    counts = sweep([c for c in CLI_CASES if c.name in FAST_CLI], HTTP_CASES, show=lambda line: None)
    print(table(counts))
    for kind, c in counts.items():
        assert c[CRASH] == 0 and c[SILENT] == 0 and c[REFUSED] == 0, (kind, c)
    assert counts["http"][CLEAR] == sum(case.bad for case in HTTP_CASES) and counts["http"][OK] >= 4
    assert counts["cli"][CLEAR] == len(FAST_CLI)
