"""The paper's study as one command: several setups (override files on train.yaml) trained with one budget on
one datalist, each evaluated on the target test volumes, summarised as the paper's tables and Fig. 5a.

    python -m scripts study --profile demo --max_iterations 600 --output_dir runs/study
    python -m scripts study --profile demo_brain ...   # the real-anatomy benchmark (scripts/brain.py)
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from monai.bundle import run

from scripts.recalibration import recalibrate
from scripts.reporting import format_duration, read_history
from scripts.self_training import ROUNDS_RECORD, train_in_rounds
from scripts.setups import (
    BUNDLE_ROOT,
    CONTINUED,
    DEFAULT_SETUPS,
    DERIVED,
    GENERATED_DATA,
    PROFILES,
    RECALIBRATED,
    SETUPS,
    bundle_config,
    config_files,
)

logger = logging.getLogger("dsan")

def train_setup(setup: str, profile: str, out: Path, budget: dict) -> float:
    """Train one setup into ``out`` (resuming if it holds checkpoints); return the wall time in seconds."""
    start = time.perf_counter()
    run("training", config_file=config_files(profile, setup), bundle_root=str(BUNDLE_ROOT), output_dir=str(out),
        ckpt_dir=str(out), logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"), **budget)
    return time.perf_counter() - start


def budget_models(out: Path, history: list[dict], marks: Sequence[float], max_minutes: float | None) -> dict:
    """Budget label -> (best model file, iterations trained) of one trained setup: one per mark it reached
    (``budget_marks.json``), then the whole run."""
    record_file = out / "budget_marks.json"
    records = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    models = {f"{m:g} min": (out / records[f"{m:g}"]["model"], records[f"{m:g}"]["iteration"])
              for m in marks if f"{m:g}" in records}
    whole = f"{max_minutes:g} min" if max_minutes is not None else "whole run"
    models[whole] = (out / "model.pt", history[-1]["iteration"] if history else 0)
    return models


def link_split(entries: list[dict], key: str, dataset_dir: Path, folder: Path) -> Path:
    """A folder of links to one key ('image' or 'label') of a datalist split, the layout inference and
    evaluation read."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        link = folder / Path(entry[key]).name
        if not link.exists():
            link.symlink_to((dataset_dir / entry[key]).resolve())
    return folder


def evaluate_setup(out: Path, model: Path, datalist: Path, dataset_dir: Path) -> dict:
    """Segment the target test volumes with ``model`` (a best model selected on target_val) and score them in
    ``<out>/test_<model name>``; the network, slicing and classes are the model's own (its model.json)."""
    test = json.loads(datalist.read_text(encoding="utf-8"))["target_test"]
    images = link_split(test, "image", dataset_dir, out / "test_images")
    labels = link_split(test, "label", dataset_dir, out / "test_labels")
    results = out / f"test_{model.stem}"
    run(config_file=str(BUNDLE_ROOT / "configs" / "inference.yaml"), bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(images), output_dir=str(results / "predictions"), ckpt_path=str(model), logging_file=False)
    run(config_file=str(BUNDLE_ROOT / "configs" / "evaluate.yaml"), bundle_root=str(BUNDLE_ROOT),
        pred_dir=str(results / "predictions"), label_dir=str(labels), output_dir=str(results / "evaluation"),
        ckpt_path=str(model), logging_file=False)
    return json.loads((results / "evaluation" / "summary.json").read_text(encoding="utf-8"))


def cell(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def asd_cell(mean: float | None, missed: int | None) -> str:
    """A mean ASD with the volumes its mean leaves out because they missed the structure (ASD inf), so that a
    miss does not pass for a good distance."""
    if not missed:
        return cell(mean)
    return f"{cell(mean)} ({missed} {'miss' if missed == 1 else 'misses'})"


def gap_closure(rows: list[dict]) -> None:
    """Adds ``gap_closed`` (%) to every row whose budget also has source-only and supervised rows:
    (Dice - source-only) / (supervised - source-only), the share of the no-adaptation-to-upper-bound gap."""
    dice = {(r["setup"], r["budget"]): r["dice"].get("average") for r in rows}
    for r in rows:
        low, high = dice.get(("source_only", r["budget"])), dice.get(("supervised", r["budget"]))
        own = dice[(r["setup"], r["budget"])]
        usable = None not in (low, high, own) and high != low
        r["gap_closed"] = 100 * (own - low) / (high - low) if usable else None


def outcome(rows: list[dict]) -> str:
    return "FAILED (reported at the end)" if any("failed" in r for r in rows) else "done"


def study_table(rows: list[dict], class_names: Sequence[str]) -> str:
    """Markdown table in the paper's format: per-class Dice (%) and ASD (voxel), their averages, and the share
    of the source-only-to-supervised gap closed at the same budget. An ASD cell whose mean leaves out volumes
    that missed the structure says how many, e.g. "2.31 (1 miss)"."""
    head = ["setup", "budget", *[f"Dice {c}" for c in class_names], "Dice avg", *[f"ASD {c}" for c in class_names],
            "ASD avg", "gap closed (%)", "iterations", "run's wall time"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        dice = [r["dice"].get(c) for c in class_names] + [r["dice"].get("average")]
        missed = r.get("asd_voxel_missed", {})  # rows reused from a study run before misses were kept have none
        asd = [asd_cell(r["asd_voxel"].get(c), missed.get(c)) for c in [*class_names, "average"]]
        lines.append("| " + " | ".join([SETUPS[r["setup"]][1], r["budget"], *map(cell, dice), *asd,
                                         cell(r.get("gap_closed"), 1), str(r["iterations"]),
                                         format_duration(r["wall_s"])]) + " |")
    return "\n".join(lines)


def summary_stat(summary: dict, metric: str, key: str, stat: str = "mean") -> float | int | None:
    """One statistic (``mean``, ``missed``, ...) of one metric for one class (or 'average') from evaluate's
    summary.json; None where it has none."""
    try:
        return summary["metrics"][metric][key][stat]
    except (KeyError, TypeError):
        return None


def study_row(setup: str, budget: str, iterations: int, wall_s: float, summary: dict,
              class_names: Sequence[str]) -> dict:
    """One row of results.json: a setup's test Dice and ASD (voxel) at one budget, per class and averaged, with
    the volumes each ASD mean leaves out as misses."""
    keys = [*class_names, "average"]
    return {
        "setup": setup, "budget": budget, "iterations": iterations, "wall_s": wall_s,
        "dice": {c: summary_stat(summary, "dice", c) for c in keys},
        "asd_voxel": {c: summary_stat(summary, "asd_voxel", c) for c in keys},
        "asd_voxel_missed": {c: summary_stat(summary, "asd_voxel", c, "missed") for c in keys},
    }


def plot_validation_curves(histories: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Target validation Dice of every run (the paper's Fig. 5a) and, beside it, how far x_s->t is from x_t
    (W1 of their intensity histograms; dotted: x_s vs x_t untranslated), against wall-clock minutes where
    the histories have them (iterations otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = all("elapsed_s" in h for history in histories.values() for h in history)

    def x(h: dict) -> float:
        return h["elapsed_s"] / 60 if timed else h["iteration"]

    fig, (dice_ax, w1_ax) = plt.subplots(1, 2, figsize=(14, 5))
    for index, (name, history) in enumerate(histories.items()):
        colour = f"C{index}"
        points = [(x(h), 100 * h["mean_dice"]) for h in history if h["mean_dice"] is not None]
        if points:
            dice_ax.plot(*zip(*points), marker="o", markersize=3, color=colour, label=SETUPS[name][1])
        translated = [(x(h), h["translation_w1"]) for h in history if "w1_s2t_t" in h.get("translation_w1", {})]
        if translated:
            w1_ax.plot([p for p, _ in translated], [w["w1_s2t_t"] for _, w in translated], marker="o",
                       markersize=3, color=colour, label=f"{SETUPS[name][1]}: x_s->t vs x_t")
            w1_ax.plot([p for p, _ in translated], [w["w1_s_t"] for _, w in translated], ":", color=colour,
                       label=f"{SETUPS[name][1]}: x_s vs x_t (untranslated)")
    for ax, label in ((dice_ax, "target validation Dice (%)"), (w1_ax, "W1 of intensity histograms")):
        ax.set_xlabel("wall clock (minutes)" if timed else "iteration")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    dice_ax.set_title(title)
    w1_ax.set_title("translation toward the target domain (lower: closer)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def failure_cause(error: BaseException) -> str:
    """One line saying why a setup failed: a guard's own message (an ``ERROR:`` SystemExit) without its prefix,
    otherwise the exception's type and first line."""
    if isinstance(error, SystemExit):
        text = str(error.code).strip()
        text = text.removeprefix("ERROR:").strip()
    else:
        text = f"{type(error).__name__}: {str(error).strip()}".rstrip(": ")
    return text.splitlines()[0] if text else type(error).__name__


def failed_row(name: str, out: Path, error: BaseException) -> dict:
    """The one row of a setup whose training or evaluation raised: no scores, the cause and the log holding the
    traceback."""
    history = read_history(out / "validation.json")
    return {"setup": name, "budget": "FAILED", "iterations": history[-1]["iteration"] if history else 0,
            "wall_s": 0.0, "dice": {}, "asd_voxel": {}, "asd_voxel_missed": {}, "failed": failure_cause(error),
            "log": str(out / "train.log")}


def failure_line(row: dict) -> str:
    return f"ERROR: study setup {row['setup']} failed (log: {row['log']}): {row['failed']}"


def study_setup(name: str, profile: str, out: Path, budget: dict, data_root: Path, datalist: Path,
                class_names: Sequence[str], threads: int | None = None, stage_minutes: float = 10.0,
                stage_rounds: int = 1) -> list[dict]:
    """Train one setup and evaluate its best model at every budget; with ``threads``, in this many torch threads
    and logging to ``<out>/train.log`` (a study running setups side by side). A setup whose results are already
    in ``<out>/study_rows.json`` (a study run before into the same folder) is not trained again. A setup that
    raises gives one ``failed_row`` (its traceback appended to ``<out>/train.log``), so the others still run.
    A setup of ``RECALIBRATED`` trains nothing: it reads the models of the setup it names, beside ``out``; one of
    ``CONTINUED`` trains for ``stage_minutes`` (in ``stage_rounds`` re-labelling rounds) from that setup's model at
    the rest of the budget."""
    try:
        done = out / "study_rows.json"
        if done.is_file():
            logger.info("study: %s already trained and evaluated: reusing %s (delete %s to retrain)", name, done, out)
            return json.loads(done.read_text(encoding="utf-8"))
        if threads is not None:
            in_own_threads_and_log(out, threads)
        if name in RECALIBRATED:
            rows = recalibrated_and_evaluated(name, profile, out, budget, data_root, datalist, class_names)
        elif name in CONTINUED:
            rows = continued_and_evaluated(name, profile, out, budget, data_root, datalist, class_names,
                                           stage_minutes, stage_rounds)
        else:
            rows = trained_and_evaluated(name, profile, out, budget, data_root, datalist, class_names)
        done.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        return rows
    except (Exception, SystemExit) as error:  # guards end a run with SystemExit: a failed setup all the same
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.log", "a", encoding="utf-8") as log:
            traceback.print_exc(file=log)
        return [failed_row(name, out, error)]


def in_own_threads_and_log(out: Path, threads: int) -> None:
    """This process (a study worker) in ``threads`` torch threads, its output appended to ``<out>/train.log``."""
    import torch

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    log = os.open(out / "train.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)


def trained_and_evaluated(name: str, profile: str, out: Path, budget: dict, data_root: Path, datalist: Path,
                          class_names: Sequence[str]) -> list[dict]:
    wall = train_setup(name, profile, out, budget)
    history = read_history(out / "validation.json")
    rows = []
    models = budget_models(out, history, budget["budget_marks"], budget["max_minutes"])
    for label, (model, iterations) in models.items():
        summary = evaluate_setup(out, model, datalist, data_root)
        rows.append(study_row(name, label, iterations, wall, summary, class_names))
    return rows


def recalibrated_and_evaluated(name: str, profile: str, out: Path, budget: dict, data_root: Path, datalist: Path,
                               class_names: Sequence[str]) -> list[dict]:
    """AdaBN at every budget: each best model of the setup ``RECALIBRATED[name]`` (trained beside ``out``) with
    its batch-norm statistics re-estimated on target_train, evaluated like a trained setup. Its iterations are
    the trained model's; its wall time the trained run's plus the re-estimation."""
    trained = out.parent / RECALIBRATED[name]
    trained_rows = json.loads((trained / "study_rows.json").read_text(encoding="utf-8"))
    if any("failed" in row for row in trained_rows):
        raise RuntimeError(f"{RECALIBRATED[name]}, whose models {name} re-estimates, failed")
    wall = {row["budget"]: row["wall_s"] for row in trained_rows}
    models = budget_models(trained, read_history(trained / "validation.json"), budget["budget_marks"],
                           budget["max_minutes"])
    rows = []
    for label, (model, iterations) in models.items():
        start = time.perf_counter()
        logger.info("study: %s", recalibrate(model, out / model.name, split="target_train", profile=profile,
                                             **budget))
        seconds = time.perf_counter() - start
        summary = evaluate_setup(out, out / model.name, datalist, data_root)
        rows.append(study_row(name, label, iterations, wall[label] + seconds, summary, class_names))
    return rows


def first_stage_mark(max_minutes: float | None, stage_minutes: float) -> float:
    """The budget mark a continued setup starts from: the budget less its own stage."""
    if max_minutes is None or not 0 < stage_minutes < max_minutes:
        raise SystemExit(f"ERROR: self_training needs --max_minutes longer than --self_training_minutes "
                         f"({stage_minutes:g}): the budget is wall clock, split between DSAN and self-training")
    return max_minutes - stage_minutes


def continued_and_evaluated(name: str, profile: str, out: Path, budget: dict, data_root: Path, datalist: Path,
                            class_names: Sequence[str], stage_minutes: float, stage_rounds: int = 1) -> list[dict]:
    """Self-training for the last ``stage_minutes`` of the budget, in ``stage_rounds`` re-labelling rounds of
    equal minutes (``scripts.self_training``), from the best model the setup ``CONTINUED[name]`` (trained beside
    ``out``) had at the rest of it; one row at the whole budget, whose iterations and wall time add both
    stages'."""
    first = first_stage_mark(budget["max_minutes"], stage_minutes)
    records = json.loads((out.parent / CONTINUED[name] / "budget_marks.json").read_text(encoding="utf-8"))
    start = records[f"{first:g}"]
    stage = {**budget, "max_minutes": stage_minutes / stage_rounds, "budget_marks": []}
    if "auxiliary" in start:  # U and D at the mark, for stage terms that read them (a mark kept before: none)
        stage.setdefault("init_auxiliary_ckpt", str(out.parent / CONTINUED[name] / start["auxiliary"]))
    began = time.perf_counter()
    rounds = train_in_rounds(config_files(profile, name), str(out.parent / CONTINUED[name] / start["model"]),
                                  str(out), stage_rounds, bundle_root=str(BUNDLE_ROOT),
                                  logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"), **stage)
    wall = time.perf_counter() - began
    summary = evaluate_setup(out, out / "model.pt", datalist, data_root)
    iterations = start["iteration"] + sum(r["iterations"] for r in rounds)
    return [study_row(name, f"{budget['max_minutes']:g} min", iterations, start["elapsed_s"] + wall, summary,
                      class_names)]


def continued_history(out: Path, first_out: Path, max_minutes: float, stage_minutes: float) -> list[dict]:
    """A continued setup's validation records, round after round, placed after the first stage's minutes and
    iterations, so its curve continues the run it started from."""
    records = json.loads((first_out / "budget_marks.json").read_text(encoding="utf-8")) \
        if (first_out / "budget_marks.json").is_file() else {}
    start = records.get(f"{max_minutes - stage_minutes:g}")
    if start is None or not (out / ROUNDS_RECORD).is_file():
        return []
    iteration, elapsed, history = start["iteration"], start["elapsed_s"], []
    for record in json.loads((out / ROUNDS_RECORD).read_text(encoding="utf-8")):
        history += [{**h, "iteration": h["iteration"] + iteration, "elapsed_s": h.get("elapsed_s", 0.0) + elapsed}
                    for h in read_history(Path(record["model"]).parent / "validation.json")]
        iteration, elapsed = iteration + record["iterations"], elapsed + record["wall_s"]
    return history


def check_overrides(profile: str, setups: Sequence[str], overrides: dict) -> None:
    """Stop with an ERROR on an override that is no config id of any of ``setups`` (train.yaml, the profile's
    and the setup's files): a misspelt option, or --help after the command, must not start hours of training."""
    declared = [bundle_config(profile, name) for name in {"full", *setups}]
    unknown_ids = sorted(key for key in overrides if not any(key in config for config in declared))
    if unknown_ids:
        raise SystemExit(f"ERROR: {unknown_ids} are neither options of study nor config ids of configs/train.yaml "
                         "or of the setups' override files; the options: python -m scripts study -- --help")


def with_trained_setups(setups: Sequence[str]) -> list[str]:
    """``setups`` with, before each setup of ``DERIVED`` whose starting setup is not among them, that one."""
    complete: list[str] = []
    for name in setups:
        base = DERIVED.get(name)
        if base is not None and base not in setups and base not in complete:
            logger.info("study: %s starts from the models of %s: training %s too", name, base, base)
            complete.append(base)
        complete.append(name)
    return complete


def train_in_turn(setups: Sequence[str], out_root: Path, common: dict) -> dict[str, list[dict]]:
    per_setup = {}
    for index, name in enumerate(setups, 1):
        logger.info("study: setup %d/%d %s -> %s", index, len(setups), name, out_root / name)
        per_setup[name] = study_setup(name, out=out_root / name, **common)
        logger.info("study: %s %s", name, outcome(per_setup[name]))
    return per_setup


def train_side_by_side(setups: Sequence[str], jobs: int, out_root: Path, common: dict) -> dict[str, list[dict]]:
    """``jobs`` setups at a time, each in its own process with cpu_count / jobs torch threads, logging to
    ``<out_root>/<setup>/train.log``."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # the workers log to their own files: this process says on the console what runs where
    print(f"study: {len(setups)} setups, {jobs} side by side in {threads} torch thread(s) each; follow them in "
          f"{out_root}/<setup>/train.log", flush=True)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(study_setup, name, out=out_root / name, threads=threads, **common): name
                   for name in setups}
        for future in as_completed(futures):
            print(f"study: {futures[future]} {outcome(future.result())}", flush=True)
        return {futures[future]: future.result() for future in futures}


def study(
    setups: Sequence[str] = tuple(DEFAULT_SETUPS), profile: str = "demo", max_iterations: int = 600,
    val_interval: int = 100, max_minutes: float | None = None, budget_marks: Sequence[float] = (),
    jobs: int = 1, output_dir: str | os.PathLike = "runs/study", dataset_dir: str | None = None,
    datalist: str | None = None, self_training_minutes: float = 10.0, self_training_rounds: int = 1,
    **overrides: object,
) -> str:
    """Train every setup with the same budget (iterations, and optionally minutes of wall clock), evaluate each
    on the target test volumes (its best model on target_val), return the table of Dice (%) and ASD (voxel),
    and write it to ``table.md``, ``results.json`` and ``validation_dice.png`` into
    ``output_dir``. ``budget_marks`` (minutes) also evaluate the best model each run had at those shorter
    budgets. ``jobs`` > 1 trains that many setups side by side, each in cpu_count / jobs torch threads and
    logging to ``<output_dir>/<setup>/train.log``. ``self_training`` spends the last ``self_training_minutes`` of
    ``max_minutes`` self-training from the best DSAN (``full``) model at the rest of the budget (a mark added to
    ``budget_marks``), in ``self_training_rounds`` re-labelling rounds. Further ``--id value`` pairs override
    config ids of every setup (e.g. ``--seed 1``)."""
    if isinstance(setups, str):  # fire passes "a,b" (or a single name) as one string
        setups = [name.strip() for name in setups.strip("[]").split(",") if name.strip()]
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown:
        raise SystemExit(f"ERROR: unknown setups {unknown}; choose from {sorted(SETUPS)}")
    setups = with_trained_setups(setups)
    if profile not in PROFILES:
        raise SystemExit(f"ERROR: profile must be one of {sorted(PROFILES)}")
    if profile in GENERATED_DATA and dataset_dir is not None and "prepare_dataset" not in overrides:
        raise SystemExit(f"ERROR: profile {profile} generates {GENERATED_DATA[profile]} into dataset_dir "
                         f"{dataset_dir!r}; train your own data on a CPU with --profile cpu")
    if jobs < 1:
        raise SystemExit(f"ERROR: jobs must be at least 1, got {jobs}")
    marks = [float(m) for m in ([budget_marks] if isinstance(budget_marks, (int, float)) else budget_marks)]
    if marks and (max_minutes is None or max(marks) >= max_minutes):
        raise SystemExit("ERROR: budget_marks must be shorter than max_minutes")
    if CONTINUED.keys() & set(setups):
        marks = sorted({*marks, first_stage_mark(max_minutes, self_training_minutes)})
    out_root = Path(output_dir).resolve()
    budget = {"max_iterations": max_iterations, "val_interval": val_interval, "max_minutes": max_minutes,
              "budget_marks": marks}
    data = {k: v for k, v in (("dataset_dir", dataset_dir), ("datalist", datalist)) if v is not None}
    budget.update(data)
    budget.update(overrides)
    parser = bundle_config(profile, "full", **data, **overrides)  # class names as the setups' models record them
    check_overrides(profile, setups, overrides)
    common = {"profile": profile, "budget": budget, "data_root": Path(parser.get_parsed_content("dataset_dir")),
              "datalist": Path(parser.get_parsed_content("datalist")),
              "class_names": parser.get_parsed_content("class_names"), "stage_minutes": self_training_minutes,
              "stage_rounds": self_training_rounds}
    trained = [name for name in setups if name not in DERIVED]
    derived = [name for name in setups if name in DERIVED]  # once the setups whose models they start from are done
    per_setup = {}
    for phase in (trained, derived):
        if phase:
            per_setup.update(train_in_turn(phase, out_root, common) if jobs == 1
                             else train_side_by_side(phase, jobs, out_root, common))
    rows = [row for name in setups for row in per_setup[name]]
    gap_closure(rows)
    table = study_table(rows, common["class_names"])
    (out_root / "table.md").write_text(table + "\n", encoding="utf-8")
    (out_root / "results.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    histories = {name: read_history(out_root / name / "validation.json") for name in trained}
    histories.update({name: continued_history(out_root / name, out_root / CONTINUED[name], max_minutes,
                                              self_training_minutes)
                      for name in derived if name in CONTINUED})
    budget_text = f"{max_minutes:g} min" if max_minutes is not None else f"{max_iterations} iterations"
    plot_validation_curves(histories, out_root / "validation_dice.png",
                           f"target validation Dice, profile {profile}, {budget_text}")
    failures = [failure_line(row) for row in rows if "failed" in row]
    if failures:
        print(table, flush=True)  # a non-zero exit: fire prints no return value
        raise SystemExit("\n".join(failures))
    return table  # fire prints it
