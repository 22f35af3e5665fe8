"""The CPU demo: DSAN and a source-only model trained with the same budget on the phantom data,
their target-domain validation Dice printed side by side."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from monai.bundle import run

from scripts.phantom import generate_demo_dataset
from scripts.reporting import format_duration, read_history

logger = logging.getLogger("dsan")

DEMO_CONFIGS = ["configs/train.yaml", "configs/cpu.yaml", "configs/demo.yaml"]


def prepare_phantom(dataset_dir: str | os.PathLike, size_profile: str) -> Path:
    """The phantom dataset in ``dataset_dir``, once the CPU sizes are known to be in force: demo.yaml layered on
    train.yaml without cpu.yaml would train the paper-size networks on it, for hours."""
    if size_profile != "cpu":
        raise SystemExit("ERROR: configs/demo.yaml needs configs/cpu.yaml before it (the phantom is CPU-sized): "
                         "--config_file \"['configs/train.yaml','configs/cpu.yaml','configs/demo.yaml']\"")
    return generate_demo_dataset(dataset_dir)


def train_demo_run(bundle_root: str | os.PathLike, output_dir: str | os.PathLike, extra_configs: list[str]) -> float:
    """Run one demo training (resuming if ``output_dir`` holds checkpoints); return its wall time."""
    root = Path(bundle_root)
    configs = [str(root / c) for c in DEMO_CONFIGS + extra_configs]
    start = time.perf_counter()
    run("training", config_file=configs, bundle_root=str(root), output_dir=str(output_dir),
        logging_file=str(root / "configs" / "logging.conf"))
    return time.perf_counter() - start


def comparison_table(rows: dict[str, list[dict]], wall_times: dict[str, float]) -> str:
    """Markdown table of the last validation of each run: mean and per-class Dice (%)."""
    last = {name: history[-1] for name, history in rows.items()}
    class_names = list(next(iter(last.values()))["class_dice"])

    def pct(v: float | None) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"

    lines = [
        "| run | iterations | wall time | mean Dice | " + " | ".join(class_names) + " |",
        "|---|---|---|---|" + "---|" * len(class_names),
    ]
    for name, rec in last.items():
        cells = " | ".join(pct(rec["class_dice"][c]) for c in class_names)
        lines.append(f"| {name} | {rec['iteration']} | {format_duration(wall_times[name])} | "
                     f"{pct(rec['mean_dice'])} | {cells} |")
    return "\n".join(lines)


def compare_with_source_only(bundle_root: str | os.PathLike, dsan_output_dir: str | os.PathLike) -> str:
    """Train DSAN, then source-only with the same iterations, batch and seed; print and return the
    table of their target-domain validation Dice (also written to <runs>/comparison.md)."""
    dsan_dir = Path(dsan_output_dir)
    runs = {"DSAN": dsan_dir, "source-only": dsan_dir.parent / "source_only"}
    extra = {"DSAN": [], "source-only": ["configs/source_only.yaml"]}
    wall_times = {}
    for name, out in runs.items():
        logger.info("demo: training %s into %s", name, out)
        wall_times[name] = train_demo_run(bundle_root, out, extra[name])
    table = comparison_table({n: read_history(d / "validation.json") for n, d in runs.items()}, wall_times)
    (dsan_dir.parent / "comparison.md").write_text(table + "\n", encoding="utf-8")
    print("\nTarget-domain validation Dice (%), last validation of each run:\n" + table, flush=True)
    return table
