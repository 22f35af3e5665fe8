"""What training tells the person watching it: progress with an ETA and the loss terms, and the
per-class validation Dice."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from scripts.networks import translate_as_in_training
from scripts.selection import LABEL_FREE

logger = logging.getLogger("dsan")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class ProgressLogger:
    """Every ``interval`` iterations: iteration i/N, seconds per iteration, ETA, and each loss term. With
    ``max_minutes`` (the run's wall-clock budget, ``scripts.trainer.WallClockBudget``) the ETA is the nearer of
    max_iterations and the end of the budget, the one the run will actually reach."""

    def __init__(self, interval: int = 10, max_minutes: float | None = None) -> None:
        self.interval = interval
        self.max_minutes = max_minutes
        self._start_time = 0.0
        self._start_iteration = -1

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._first_iteration)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self._log)

    def _first_iteration(self, engine: Engine) -> None:
        if self._start_iteration < 0:  # measured from here, so a resumed run's ETA counts only what is left
            self._start_time = time.perf_counter()
            self._start_iteration = engine.state.iteration - 1

    def _log(self, engine: Engine) -> None:
        done = engine.state.iteration - self._start_iteration
        total = engine.state.max_epochs * engine.state.epoch_length
        elapsed = time.perf_counter() - self._start_time
        per_it = elapsed / max(done, 1)
        eta, end = per_it * (total - engine.state.iteration), ""
        if self.max_minutes is not None and 60.0 * self.max_minutes - elapsed < eta:
            eta, end = max(0.0, 60.0 * self.max_minutes - elapsed), f" (the {self.max_minutes:g} min budget)"
        terms = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(engine.state.output.items()))
        logger.info("iter %d/%d  %.2f s/it  ETA %s%s  %s", engine.state.iteration, total, per_it,
                    format_duration(eta), end, terms)


TRANSLATION_KEYS = ("w1_s2t_t", "w1_t2s_s", "w1_s_t")
"""The translation distances the trainer reports (``scripts.trainer.translation_distances``)."""


class IntervalMeans:
    """Means of some trainer outputs over each validation interval (by default the translation distances), which
    ``ValidationReport`` logs next to the Dice: one number per validation instead of one per noisy batch. Also
    keeps the wall-clock time training started (``started``, this process's start after a resume)."""

    def __init__(self, keys: Sequence[str] = TRANSLATION_KEYS) -> None:
        self.keys = list(keys)
        self.started: float | None = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._add)

    def _start(self, engine: Engine) -> None:
        self.started = time.time()

    def _add(self, engine: Engine) -> None:
        for key in self.keys:
            if key in engine.state.output:
                self._sums[key] = self._sums.get(key, 0.0) + float(engine.state.output[key])
                self._counts[key] = self._counts.get(key, 0) + 1

    def pop(self) -> dict[str, float]:
        """The means since the last call, then start again."""
        means = {key: self._sums[key] / self._counts[key] for key in self.keys if self._counts.get(key)}
        self._sums, self._counts = {}, {}
        return means


class ValidationReport:
    """After each validation: puts the mean Dice of every foreground class into ``engine.state.metrics``
    as ``val_dice_<name>`` (so Stats/TensorBoard handlers log them), logs one line with the Dice (where the
    validation volumes have labels) and every label-free selection criterion (scripts/selection.py), and appends
    the record to the JSON ``history_file`` (one entry per validation, keyed by training iteration).

    Reads the per-volume, per-class details that MeanDice(save_details=True) keeps for ``metric_name``.
    A class absent from every validation volume is reported as nan (null in the JSON). With ``interval_means``
    (the trainer's ``IntervalMeans``), the translation distances of the interval are logged on the same line,
    put into the metrics as ``val_<key>`` and recorded in the history too.
    """

    def __init__(
        self, class_names: Sequence[str], iterations_per_epoch: int, history_file: str | os.PathLike | None = None,
        metric_name: str = "val_mean_dice", interval_means: IntervalMeans | None = None,
    ) -> None:
        self.interval_means = interval_means
        self.class_names = list(class_names)
        self.iterations_per_epoch = iterations_per_epoch
        self.history_file = None if history_file is None else Path(history_file)
        self.metric_name = metric_name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _dice(self, engine: Engine) -> tuple[float, list[float]] | None:
        """(mean, per-class) Dice, or None without labels."""
        if self.metric_name not in engine.state.metrics:
            return None
        details = engine.state.metric_details[self.metric_name]  # (volumes, foreground classes)
        per_class = torch.nanmean(torch.as_tensor(details, dtype=torch.float32), dim=0).tolist()
        for class_name, value in zip(self.class_names, per_class):
            engine.state.metrics[f"val_dice_{class_name}"] = value
        return float(engine.state.metrics[self.metric_name]), per_class

    def __call__(self, engine: Engine) -> None:
        dice = self._dice(engine)
        criteria = {name: float(engine.state.metrics[f"val_{name}"]) for name in LABEL_FREE
                    if f"val_{name}" in engine.state.metrics}
        translation = self.interval_means.pop() if self.interval_means is not None else {}
        engine.state.metrics.update({f"val_{key}": value for key, value in translation.items()})
        iteration = engine.state.epoch * self.iterations_per_epoch
        logger.info("validation at iteration %d: %s%s%s", iteration, describe_dice(dice, self.class_names),
                    describe_criteria(criteria), describe_translation(translation))
        if self.history_file is not None:
            self._append(iteration, dice, criteria, translation)

    def _append(self, iteration: int, dice: tuple[float, list[float]] | None, criteria: dict[str, float],
                translation: dict[str, float]) -> None:
        mean, per_class = dice if dice is not None else (math.nan, [math.nan] * len(self.class_names))
        history = read_history(self.history_file)
        history = [h for h in history if h["iteration"] != iteration]  # a resumed run may validate again
        history.append({
            "iteration": iteration,
            "time": time.time(),
            "mean_dice": None if math.isnan(mean) else mean,
            "class_dice": {n: None if math.isnan(v) else v for n, v in zip(self.class_names, per_class)},
            "criteria": {n: None if math.isnan(v) else v for n, v in criteria.items()},
            **({"translation_w1": translation} if translation else {}),
            **self._elapsed(),
        })
        self.history_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.history_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(history, key=lambda h: h["iteration"]), indent=1), encoding="utf-8")
        tmp.replace(self.history_file)

    def _elapsed(self) -> dict[str, float]:
        started = None if self.interval_means is None else self.interval_means.started
        return {} if started is None else {"elapsed_s": round(time.time() - started, 1)}


def describe_dice(dice: tuple[float, list[float]] | None, class_names: Sequence[str]) -> str:
    """'Dice (%) mean 61.20  AA 70.10  ...', or that there are no labels to score."""
    if dice is None:
        return "no target labels (Dice not computed)"
    mean, per_class = dice
    return f"Dice (%) mean {100 * mean:.2f}  " + "  ".join(f"{n} {100 * v:.2f}" for n, v in zip(class_names, per_class))


def describe_criteria(criteria: dict[str, float]) -> str:
    """'  |  confidence 0.912, info_max 0.301, symmetry 0.774' (empty without them)."""
    return "  |  " + ", ".join(f"{name} {value:.3f}" for name, value in criteria.items()) if criteria else ""


def describe_translation(distances: dict[str, float]) -> str:
    """'  |  W1(x_s->t, x_t) 0.08, W1(x_t->s, x_s) 0.10, untranslated W1(x_s, x_t) 0.31' (empty without them)."""
    names = {"w1_s2t_t": "W1(x_s->t, x_t)", "w1_t2s_s": "W1(x_t->s, x_s)", "w1_s_t": "untranslated W1(x_s, x_t)"}
    parts = [f"{names[key]} {distances[key]:.3f}" for key in TRANSLATION_KEYS if key in distances]
    return "  |  " + ", ".join(parts) if parts else ""


def read_history(path: str | os.PathLike) -> list[dict]:
    """The validation records ``ValidationReport`` wrote to ``path`` (empty if none yet)."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


TRANSLATION_TERMS = frozenset({"gen_t", "gen_s"})
"""The terms of Eq. (12) that train U_t / U_s: a run without them has no translation to preview."""


class TranslationPreview:
    """Every ``interval`` validations, renders x_s, x_s->t, x_t, x_t->s for a fixed set of training slices
    (the first batch the trainer drew) into ``<output_dir>/translations/iter_<N>.png``, so the translation
    sub-networks' progress can be seen; with ``writer`` (a TensorBoard SummaryWriter) also as an image."""

    def __init__(self, output_dir: str | os.PathLike, interval: int = 1, num_samples: int = 4,
                 writer: object | None = None) -> None:
        self.output_dir = Path(output_dir) / "translations"
        self.interval = interval
        self.num_samples = num_samples
        self.writer = writer
        self._fixed: tuple[torch.Tensor, torch.Tensor] | None = None

    def attach(self, engine: Engine) -> None:
        if not TRANSLATION_TERMS & set(engine.terms):  # source-only, self-training: no translation to show
            return
        # the first batch this run draws (after a resume too) becomes the fixed preview set
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=lambda *_: self._fixed is None),
                                 self._keep_batch)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def _keep_batch(self, engine: Engine) -> None:
        batch = engine.state.batch
        self._fixed = tuple(torch.as_tensor(batch[k][: self.num_samples]).detach().cpu().clone()
                            for k in ("source_image", "target_image"))

    def translate(self, engine: Engine) -> dict[str, torch.Tensor]:
        """x_s, x_s->t, x_t, x_t->s of the kept slices, translated as the training passes translate them."""
        x_s, x_t = (x.to(engine.state.device) for x in self._fixed)
        return {"x_s": x_s, "x_s->t": translate_as_in_training(engine.translation_encoder, engine.decoder_t, x_s),
                "x_t": x_t, "x_t->s": translate_as_in_training(engine.translation_encoder, engine.decoder_s, x_t)}

    def __call__(self, engine: Engine) -> None:
        if self._fixed is None:
            return
        images = self.translate(engine)
        path = self.output_dir / f"iter_{engine.state.iteration:06d}.png"
        save_image_grid(images, path, title=f"iteration {engine.state.iteration}")
        if self.writer is not None:
            grid = torch.cat([torch.cat(list(img[:, 0].cpu()), dim=1) for img in images.values()], dim=0)
            self.writer.add_image("translations", (grid.clamp(-1, 1) + 1) / 2, engine.state.iteration,
                                  dataformats="HW")


class NullSummaryWriter:
    """Accepts and drops what a TensorBoard SummaryWriter would write (ranks other than 0)."""

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: None


def rank_zero_summary_writer(log_dir: str | os.PathLike) -> object:
    """A TensorBoard SummaryWriter on rank 0 (or without torchrun), a NullSummaryWriter elsewhere, so
    data-parallel ranks never write event files of their own."""
    from torch.utils.tensorboard import SummaryWriter

    from scripts.distributed import rank

    return SummaryWriter(log_dir=str(log_dir)) if rank() == 0 else NullSummaryWriter()


def save_image_grid(columns: dict[str, torch.Tensor], path: str | os.PathLike, title: str = "") -> Path:
    """PNG with one column per named (B, 1, H, W) image batch in [-1, 1] and one row per sample."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = min(len(v) for v in columns.values())
    fig, axes = plt.subplots(rows, len(columns), figsize=(2.2 * len(columns), 2.2 * rows), squeeze=False)
    for col, (name, batch) in enumerate(columns.items()):
        for row in range(rows):
            ax = axes[row][col]
            ax.imshow(batch[row, 0].detach().float().cpu().numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path
