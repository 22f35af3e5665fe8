"""The bundle's own command line (fire): `python -m scripts COMMAND --help`.

Training, inference and evaluation run through `python -m monai.bundle run`; these are the extras."""

from __future__ import annotations

from scripts.benchmark import benchmark


def main() -> None:
    import fire

    fire.Fire({"benchmark": benchmark})
