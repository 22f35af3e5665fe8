"""The bundle's own command line (fire): `python -m scripts COMMAND --help`.

Training, inference and evaluation run through `python -m monai.bundle run`; these are the extras."""

from __future__ import annotations

import fire

from scripts import benchmark
from scripts.prepare import PrepareCommand
from scripts.pseudo_labels import share_sweep
from scripts.recalibration import recalibrate
from scripts.selection_study import selection_study
from scripts.self_training import train_in_rounds
from scripts.study import study
from scripts.translation_check import translation_check


class BenchmarkCommand:
    """Speed and memory benchmarks: they print measurements side by side, they assert nothing."""

    def training(self, profile: str = "demo", iterations: int = 10, rounds: int = 5, device: str | None = None,
                 dataset_dir: str | None = None) -> None:
        """Seconds per iteration of the bundle's DSAN trainer (its configs' data pipeline) vs a bare PyTorch loop
        (plain-tensor sampling), their ratio, the data-loading share and the rate against a same-run matmul; on
        ``dataset_dir``'s datalist.json when given, else on a generated phantom."""
        benchmark.benchmark(profile, iterations, rounds, device, dataset_dir)

    def inference(self, shape: tuple[int, int, int] = (256, 256, 128), encoder_width: float = 1.0,
                  batch_size: int = 8, rounds: int = 2, device: str | None = None) -> None:
        """Seconds per volume of configs/inference.yaml vs a bare batched forward, and the throughput ratio."""
        benchmark.benchmark_inference(tuple(shape), encoder_width, batch_size, rounds, device)

    def memory(self, shape: tuple[int, int, int] = (512, 512, 300), encoder_width: float = 1.0,
               batch_size: int = 8) -> None:
        """Peak resident memory of a fresh process running configs/inference.yaml on one volume on the CPU."""
        benchmark.peak_inference_memory(tuple(shape), encoder_width, batch_size)


def main() -> None:
    fire.Fire({"benchmark": BenchmarkCommand(), "prepare": PrepareCommand(), "recalibrate": recalibrate,
               "selection_study": selection_study, "self_training_rounds": train_in_rounds, "share_sweep": share_sweep,
               "study": study, "translation_check": translation_check})
