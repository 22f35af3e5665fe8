"""The bundle's own command line (fire): `python -m scripts COMMAND --help`.

Training, inference and evaluation run through `python -m monai.bundle run`; these are the extras."""

from __future__ import annotations

import fire

from scripts.benchmark import benchmark
from scripts.prepare import PrepareCommand


def benchmark_command(profile: str = "demo", iterations: int = 10, rounds: int = 5, device: str | None = None) -> None:
    """Seconds per iteration of the bundle's trainer vs a bare PyTorch loop, and their ratio."""
    benchmark(profile, iterations, rounds, device)


def main() -> None:
    fire.Fire({"benchmark": benchmark_command, "prepare": PrepareCommand()})
