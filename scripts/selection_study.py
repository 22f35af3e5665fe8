"""How well each model-selection criterion picks, measured on runs that kept the checkpoint of every validation
(``--train#checkpoint_saver#n_saved 1000``) on a dataset whose target volumes have labels (the phantom):

    python -m scripts selection_study runs/sel_s0 runs/sel_s1 runs/sel_s2 --profile demo --output_dir docs/selection

Each checkpoint is scored as training scores it (the config's own validation evaluator, scripts/selection.py) on
``target_val`` and, for the truth, on ``target_test``. Per criterion and run: the regret (test Dice of the
checkpoint target-label selection picks minus test Dice of the checkpoint the criterion picks) and the Spearman
correlation between the criterion and test Dice over the checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch
from scipy.stats import spearmanr

from scripts.checkpoints import CHECKPOINT_PATTERN
from scripts.selection import METRICS
from scripts.setups import bundle_config

NETWORK_KEYS = {"network": "segmenter", "translation_encoder": "translation_encoder", "decoder_s": "decoder_s"}


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, file) of every full-state checkpoint in a run folder, oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint_epoch=*.pt")
             if (m := CHECKPOINT_PATTERN.search(p.name))]
    return sorted(found)


def split_evaluator(profile: str, setup: str, split: str, overrides: dict) -> tuple[dict, object]:
    """The networks and the validation evaluator of a setup's config, scoring ``split`` with no handler (nothing
    logged or saved)."""
    parser = bundle_config(profile, setup, **{"device": "$torch.device('cpu')", "selection": "target_labels",
                                              "validate#split": split, "validate#handlers": [], **overrides})
    networks = {key: parser.get_parsed_content(key) for key in NETWORK_KEYS}
    return networks, parser.get_parsed_content("validate#evaluator")


def score_checkpoint(path: Path, networks: dict, evaluator: object) -> dict[str, float]:
    """Every validation metric of one checkpoint's weights."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key, saved in NETWORK_KEYS.items():
        networks[key].load_state_dict(state[saved])
    evaluator.run()
    return {name: float(value) for name, value in evaluator.state.metrics.items() if isinstance(value, (int, float))}


def score_run(run_dir: Path, val: tuple, test: tuple) -> list[dict]:
    """One record per checkpoint: its epoch, every criterion on target_val and the Dice on target_test."""
    records = []
    for epoch, path in checkpoints(run_dir):
        on_val = score_checkpoint(path, *val)
        records.append({"epoch": epoch, **{name: on_val.get(metric, math.nan) for name, metric in METRICS.items()},
                        "last": float(epoch),  # scored alone, each checkpoint is the evaluator's first epoch
                        "test_dice": score_checkpoint(path, *test)["val_mean_dice"]})
        print(f"selection_study: {run_dir.name} epoch {epoch}: test Dice {100 * records[-1]['test_dice']:.2f}",
              flush=True)
    return records


def pick(records: Sequence[dict], criterion: str) -> dict:
    """The checkpoint a criterion selects: its highest score (the earliest on a tie, as the saver keeps it)."""
    usable = [r for r in records if not math.isnan(r[criterion])]
    return max(usable, key=lambda r: r[criterion]) if usable else records[-1]


def criterion_summary(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per criterion: regret per run (Dice points), its mean, Spearman rho per run and its mean."""
    summary = {}
    for criterion in METRICS:
        regrets, rhos = [], []
        for records in runs.values():
            reference = pick(records, "target_labels")["test_dice"]
            regrets.append(100 * (reference - pick(records, criterion)["test_dice"]))
            pairs = [(r[criterion], r["test_dice"]) for r in records if not math.isnan(r[criterion])]
            rho = spearmanr(*zip(*pairs)).statistic if len(pairs) > 2 else math.nan
            rhos.append(float(rho))
        summary[criterion] = {"regret": regrets, "mean_regret": statistics.fmean(regrets), "spearman": rhos,
                              "mean_spearman": statistics.fmean(rhos)}
    return summary


def summary_table(summary: dict[str, dict], runs: Sequence[str]) -> str:
    head = ["criterion", "metric", "mean regret (Dice points)", *[f"regret {r}" for r in runs], "mean Spearman",
            *[f"Spearman {r}" for r in runs]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for criterion, s in summary.items():
        lines.append("| " + " | ".join([criterion, METRICS[criterion], f"{s['mean_regret']:.2f}",
                                         *[f"{v:.2f}" for v in s["regret"]], f"{s['mean_spearman']:.2f}",
                                         *[f"{v:.2f}" for v in s["spearman"]]]) + " |")
    return "\n".join(lines)


def plot_runs(runs: dict[str, list[dict]], path: Path) -> Path:
    """One panel per run: test Dice and each criterion (min-max scaled over the run) against the epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, (name, records) in zip(axes[0], runs.items()):
        epochs = [r["epoch"] for r in records]
        for index, key in enumerate(["test_dice", *[c for c in METRICS if c != "last"]]):
            values = [r[key] for r in records]
            finite = [v for v in values if not math.isnan(v)]
            low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
            scaled = [(v - low) / (high - low) if high > low else 0.5 for v in values]
            ax.plot(epochs, scaled, marker="o", markersize=3, color=f"C{index}", linewidth=2.5 if index == 0 else 1,
                    label="test Dice (truth)" if key == "test_dice" else f"{key} (target_val)")
        ax.set_title(name)
        ax.set_xlabel("validation (epoch)")
        ax.set_ylabel("min-max scaled over the run")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def selection_study(*run_dirs: str | os.PathLike, profile: str = "demo", setup: str = "full",
                    output_dir: str | os.PathLike = "runs/selection_study", **overrides: object) -> str:
    """Score every checkpoint of each run, write ``checkpoints.json``, ``summary.json``, ``table.md`` and
    ``criteria.png`` into ``output_dir``, and return the table. Further ``--id value`` pairs override config ids
    (e.g. ``--dataset_dir`` for runs on another dataset)."""
    if not run_dirs:
        raise SystemExit("ERROR: give at least one run folder holding checkpoint_epoch=N.pt files")
    folders = [Path(d).resolve() for d in run_dirs]
    for folder in folders:
        if len(checkpoints(folder)) < 2:
            raise SystemExit(f"ERROR: {folder} holds fewer than 2 checkpoints: train with "
                             "--train#checkpoint_saver#n_saved 1000 to keep one per validation")
    val = split_evaluator(profile, setup, "target_val", overrides)
    test = split_evaluator(profile, setup, "target_test", overrides)
    runs = {f"{folder.parent.name}/{folder.name}": score_run(folder, val, test) for folder in folders}
    summary = criterion_summary(runs)
    table = summary_table(summary, list(runs))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints.json").write_text(json.dumps(runs, indent=1), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    plot_runs(runs, out / "criteria.png")
    return table
