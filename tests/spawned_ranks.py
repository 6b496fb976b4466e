"""Process groups the distributed tests spawn themselves, bounded in time: a rank that
hangs (a collective waiting for a rank that raised) is killed, so it fails its test
instead of blocking the run."""
from __future__ import annotations

import multiprocessing
import socket
import time


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(target, args_of_rank: list[tuple], timeout_s: float) -> None:
    """``target(*args)`` in one spawned process per entry of ``args_of_rank``, all
    started together; any still alive ``timeout_s`` after the start is killed."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=target, args=args) for args in args_of_rank]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
