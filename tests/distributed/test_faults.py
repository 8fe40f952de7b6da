"""A rank that dies or hangs ends the run with one clear error, never a hang."""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mosaic_dllm.cli.commands import lost_ranks
from tests.processes import REPO


def rank_of(pid: int) -> int | None:
    """The torchrun rank of process `pid` (None: not a rank)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in environ if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_a_killed_rank_ends_the_run_with_one_clear_error(tiny_checkpoints):
    """Rank 1 is killed (SIGKILL) once the ranks are denoising: the launcher ends the run within
    seconds and its last line names the rank and the signal."""
    argv = ["generate", "--model", str(tiny_checkpoints["dream"]), "--prompt", "Return the"]
    argv += ["--gen-length", "200", "--steps", "200", "--executor", "sequence-parallel", "--nproc", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mosaic_dllm.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    err: list[bytes] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read1(4096), b"")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while b"denoising" not in b"".join(err):  # rank 0's progress bar: the ranks are in their steps
        assert proc.poll() is None and time.time() < deadline, b"".join(err)[-2000:]
        time.sleep(0.05)
    victim = next(pid for pid in children(proc.pid) if rank_of(pid) == 1)
    os.kill(victim, signal.SIGKILL)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the launcher hung after a rank died")
    reader.join(timeout=5)
    lines = [line for line in b"".join(err).decode().splitlines() if line.strip()]
    assert proc.returncode == 2
    assert lines[-1].startswith("error: the run failed across its ranks:"), lines[-5:]
    assert f"rank 1 (pid {victim}) was killed by SIGKILL" in lines[-1]


def hung_peer(rank: int, out: str) -> None:
    """Rank 1 never joins the collective; rank 0 must give up after the group's timeout."""
    store = f"file://{out}.store"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2, timeout=timedelta(seconds=2))
    if rank == 1:
        time.sleep(6)
        os._exit(0)
    begin = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(4))
    except RuntimeError as exc:
        Path(f"{out}.said").write_text(f"{time.perf_counter() - begin:.1f}\n{lost_ranks(exc)}")
    os._exit(0)


def test_a_hung_rank_fails_the_collective_after_the_timeout(tmp_path):
    """The group's timeout (--rank-timeout) bounds the wait for a rank that stops answering, and
    the error says what happened."""
    out = str(tmp_path / "hang")
    mp.spawn(hung_peer, args=(out,), nprocs=2)
    seconds, said = Path(f"{out}.said").read_text().split("\n", 1)
    assert float(seconds) < 5  # the 2 s timeout, not the peer leaving at 6 s
    assert said.startswith("another rank died or stopped answering (") and said.endswith("this rank stops too")
