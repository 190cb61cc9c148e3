"""Shared helpers of the benchmarks: machine facts, timing, memory, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

RESULTS = Path(__file__).parent / "results"

hf_logging.disable_progress_bar()  # weight-loading bars would bury the benchmarks' own lines


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """Wall time (s), peak resident memory above the start (bytes) and the result of ``fn``."""
    start_rss = _rss_bytes()
    peak = [start_rss]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        watcher.join()
    return elapsed, max(peak[0] - start_rss, 0), result


def median(values: list[float]) -> float:
    return statistics.median(values)


def write(name: str, payload: dict[str, Any]) -> Path:
    """Write ``results/NAME.json`` with the machine facts added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False, default=float))
    return path
