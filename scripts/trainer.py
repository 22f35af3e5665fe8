"""The DSAN adversarial trainer: an Ignite engine (monai.engines.Trainer) whose iteration is Sec. III.

Code name -> paper symbol (Han et al., Fig. 2):

    segmenter.encoder                      E (shared encoder)
    segmenter.aux_classifier / main_...    C_1 (layer3) / C_2 (layer4)
    translation_encoder                    E of the translation sub-networks (is segmenter.encoder unless
                                           the "unshared encoders" variant of Table V)
    decoder_s / decoder_t                  U_s / U_t (the same module in the "shared decoders" variant)
    image_discriminator_s / _t             D_s / D_t
    prediction_discriminators[i]           D_p_i, Eq. (9)
    translated_prediction_discriminators   D_p_i of Eq. (10) (the same modules unless "unshared discriminators")
    x_s2t = U_t(E(x_s)), x_t2s = U_s(E(x_t))   x_s->t, x_t->s

One iteration: (a) with every discriminator frozen, update E, C, U_s, U_t on Eq. (12);
(b) update D_s, D_t, D_p on detached fakes. ``terms`` selects which of Eq. (12)'s five terms are on
(the rows of Table IV); a term that is off is neither computed nor reported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import Trainer, Workflow
from torch import nn

from scripts import losses
from scripts.checkpoints import save_atomically, settings_file
from scripts.distributed import average_gradients, broadcast_from_rank_zero, rank
from scripts.metrics import intensity_distance
from scripts.networks import Segmenter, frozen, has_batch_statistics, running_stats_kept

logger = logging.getLogger("dsan")

TERMS = ("gen_t", "gen_s", "seg_s", "seg_s2t", "adv_sec")
"""The five terms of Eq. (12): L_gen^t, L_gen^s, L_seg^s, L_seg^s->t, L_adv^sec."""
SELF_TRAINING_TERM = "seg_t"
"""Not the paper's: L_seg^t, Eq. (7)'s loss on target images against their pseudo-labels (self-training,
scripts/pseudo_labels.py), added to Eq. (12) with lambda_seg."""
ALL_TERMS = (*TERMS, SELF_TRAINING_TERM)


NONFINITE_POLICIES = ("stop", "skip")

RUNNING_STATS = ("all", "target")
"""Which passes of E update its batch-norm running statistics (``DSANTrainer`` docstring)."""


class NonFiniteLossError(SystemExit):
    """A NaN or infinite loss term under ``nonfinite: stop``: one message, no traceback, exit status 1."""


def prepare_unpaired_batch(
    batch: dict[str, torch.Tensor], device: torch.device | str, non_blocking: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x_s, y_s, x_t, y_t) as plain tensors on ``device`` from one ``UnpairedBatches`` item; x_t is None when
    the stream draws no target batches (``reads_target_images``), y_t unless the target images carry
    pseudo-labels (self-training)."""

    def to_device(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.as_tensor() if hasattr(t, "as_tensor") else t  # MetaTensor bookkeeping is not needed here
        return t.to(device, non_blocking=non_blocking)

    return (to_device(batch["source_image"]), to_device(batch["source_label"]),
            to_device(batch.get("target_image")), to_device(batch.get("target_label")))


GENERATOR_PASSES = {
    "gen_t": ("rec_t", "x_s2t"),
    "gen_s": ("rec_s", "x_t2s"),
    "seg_s": ("logits_s",),
    "seg_s2t": ("logits_s2t",),
    "adv_sec": ("logits_t", "logits_t2s"),
    "seg_t": ("logits_t",),
}
"""The forward passes each term of Eq. (12) (and L_seg^t) reads in the generator step, in the order they run."""

DISCRIMINATOR_PASSES = {
    "gen_t": ("x_s2t",),
    "gen_s": ("x_t2s",),
    "adv_sec": ("logits_s", "logits_t", "logits_s2t", "logits_t2s"),
}
"""The forward passes the discriminator step reads (Eq. (1), (2), (9), (10)) for each term that is on."""


TARGET_TERMS = frozenset({"gen_t", "gen_s", "adv_sec", SELF_TRAINING_TERM})
"""The terms that read x_t: L_gen^t (Eq. (5), its reconstruction Eq. (3)), L_gen^s (Eq. (6), its
translation Eq. (2)), L_adv^sec (Eq. (9)-(11)) and self-training's L_seg^t."""


def reads_target_images(terms: Iterable[str]) -> bool:
    """Whether training with ``terms`` ever reads a target image x_t; a source-only run (Eq. (7) alone, or with
    Eq. (8)) does not, and its data stream then draws no target batches (configs/train.yaml ``train#batches``)."""
    return bool(TARGET_TERMS & set(terms))


def planned_passes(terms: Iterable[str]) -> tuple[list[str], list[str]]:
    """(passes the generator step needs, passes only the discriminator step needs), each in running order,
    for the active ``terms``: an ablation that drops a term also skips the passes only that term needed."""
    ordered = [term for term in ALL_TERMS if term in set(terms)]
    generator = list(dict.fromkeys(p for term in ordered for p in GENERATOR_PASSES[term]))
    discriminator = [p for p in dict.fromkeys(p for term in ordered for p in DISCRIMINATOR_PASSES.get(term, ()))
                     if p not in generator]
    return generator, discriminator


class forward_pass(cached_property):  # noqa: N801 (a decorator, named like the cached_property it extends)
    """A pass of ``DSANForward``: computed once, and only while the forward is not yet sealed, so every pass of
    an iteration runs where ``DSANTrainer._iteration`` plans it and none is computed later on first use."""

    def __get__(self, instance: DSANForward | None, owner: type | None = None) -> Any:
        if instance is not None and instance.sealed and self.attrname not in instance.__dict__:
            raise RuntimeError(f"forward pass {self.attrname!r} was not planned for this iteration")
        return super().__get__(instance, owner)


class DSANForward:
    """The forward passes of one iteration. ``run(passes)`` computes the named passes (and the passes they
    read) in order; ``seal()`` then forbids any other, so the losses can only read what was planned."""

    def __init__(self, trainer: DSANTrainer, x_s: torch.Tensor, x_t: torch.Tensor | None) -> None:
        self.net = trainer
        self.x_s, self.x_t = x_s, x_t
        self.sealed = False
        self._maps: dict[str, list[torch.Tensor]] = {}
        self._running: set[str] = set()

    def run(self, passes: Sequence[str]) -> None:
        self._running = set(passes)
        for name in passes:
            getattr(self, name)

    def seal(self) -> None:
        self.sealed = True

    def _translation_features(self, x: torch.Tensor, seg_features: Callable[[], tuple]) -> torch.Tensor:
        if self.net.translation_encoder is self.net.segmenter.encoder:
            return seg_features()[1]
        return self.net.translation_encoder(x)[1]

    def _encode(self, x: torch.Tensor, target_pass: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """E(x); under ``running_stats: target`` only the pass on x_t updates E's running statistics."""
        keep = self.net.running_stats_follow_target and not target_pass
        with running_stats_kept(self.net.segmenter.encoder, keep):
            return self.net.segmenter.encoder(x)

    def _levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.segmenter.classify(self._encode(x))

    @forward_pass
    def features_s(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode(self.x_s)

    @forward_pass
    def features_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode(self.x_t, target_pass=True)

    @forward_pass
    def z_s(self) -> torch.Tensor:
        return self._translation_features(self.x_s, lambda: self.features_s)

    @forward_pass
    def z_t(self) -> torch.Tensor:
        return self._translation_features(self.x_t, lambda: self.features_t)

    def _decoded_together(self, own: str, other: str) -> bool:
        """Whether a decoder's two passes (its reconstruction ``own`` and its translation ``other``) run as one
        batch: both are planned in the same run, and the decoder has no batch statistics (instance norm, the
        default, has none), so one call is both calls' computation in fewer, larger kernels."""
        return {own, other} <= self._running and self.net.decoders_per_image

    @forward_pass
    def decoded_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rec_t, x_s2t) = U_t on (E(x_t), E(x_s)) as one batch: Eq. (3)'s reconstruction, Eq. (1)'s translation."""
        return self.net.decoder_t(torch.cat([self.z_t, self.z_s])).split([len(self.x_t), len(self.x_s)])

    @forward_pass
    def decoded_s(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rec_s, x_t2s) = U_s on (E(x_s), E(x_t)) as one batch: Eq. (4)'s reconstruction, Eq. (2)'s translation."""
        return self.net.decoder_s(torch.cat([self.z_s, self.z_t])).split([len(self.x_s), len(self.x_t)])

    @forward_pass
    def x_s2t(self) -> torch.Tensor:
        return self.decoded_t[1] if self._decoded_together("rec_t", "x_s2t") else self.net.decoder_t(self.z_s)

    @forward_pass
    def x_t2s(self) -> torch.Tensor:
        return self.decoded_s[1] if self._decoded_together("rec_s", "x_t2s") else self.net.decoder_s(self.z_t)

    @forward_pass
    def rec_s(self) -> torch.Tensor:
        return self.decoded_s[0] if self._decoded_together("rec_s", "x_t2s") else self.net.decoder_s(self.z_s)

    @forward_pass
    def rec_t(self) -> torch.Tensor:
        return self.decoded_t[0] if self._decoded_together("rec_t", "x_s2t") else self.net.decoder_t(self.z_t)

    @forward_pass
    def logits_s(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.segmenter.classify(self.features_s)

    @forward_pass
    def logits_t(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.segmenter.classify(self.features_t)

    def _translated_input(self, image: torch.Tensor) -> torch.Tensor:
        return image.detach() if self.net.detach_translations else image

    @forward_pass
    def logits_s2t(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._levels(self._translated_input(self.x_s2t))

    @forward_pass
    def logits_t2s(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._levels(self._translated_input(self.x_t2s))

    def maps(self, name: str) -> list[torch.Tensor]:
        """Softmax prediction maps at image size of ``logits_<name>``, for D_p_i (computed once)."""
        if name not in self._maps:
            self._maps[name] = losses.prediction_maps(getattr(self, f"logits_{name}"), self.x_s.shape[-2:])
        return self._maps[name]


def translation_distances(f: DSANForward) -> dict[str, torch.Tensor]:
    """Whether translation moves images toward the other domain, for the translations this iteration computed
    anyway: ``w1_s2t_t`` = intensity_distance(x_s->t, x_t) and ``w1_t2s_s`` = intensity_distance(x_t->s, x_s),
    next to ``w1_s_t`` = intensity_distance(x_s, x_t), the distance before translation."""
    computed = vars(f)  # cached_property keeps each pass computed in the instance's __dict__
    pairs = {"w1_s2t_t": ("x_s2t", f.x_t), "w1_t2s_s": ("x_t2s", f.x_s)}
    out = {name: intensity_distance(computed[key], other) for name, (key, other) in pairs.items() if key in computed}
    if out:
        out["w1_s_t"] = intensity_distance(f.x_s, f.x_t)
    return out


class WallClockBudget:
    """Ends training at the last validation that fits in ``minutes`` of wall clock (None: no limit), so setups
    of different cost can be compared at equal time: at each epoch end (after its validation), training stops
    if one more epoch as long as the last one would overrun the budget.

    ``marks`` (minutes, shorter than ``minutes``) give the shorter budgets of the same run: at the last
    validation that fits in each mark, the best model so far (``best_model``) is copied to ``model_<m>min.pt``
    beside it, the trainer's other networks at that iteration go to ``auxiliary_<m>min.pt``
    (``DSANTrainer.auxiliary_networks``, for a stage that continues from the mark) and the iteration is recorded
    in ``budget_marks.json``. With a constant learning rate (the paper's), the run up to a mark is the run a
    budget of that many minutes would have made."""

    def __init__(self, minutes: float | None = None, marks: Sequence[float] = (),
                 best_model: str | os.PathLike | None = None) -> None:
        if marks and best_model is None:
            raise ValueError("budget marks need best_model, the file the best-model saver writes")
        self.minutes = minutes
        self.marks = sorted(float(m) for m in marks)
        self.best_model = None if best_model is None else Path(best_model)
        self._start = self._last_epoch_end = 0.0
        self._pending: list[float] = []

    def attach(self, engine: Engine) -> None:
        if self.minutes is not None or self.marks:
            engine.add_event_handler(Events.STARTED, self._started)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _started(self, engine: Engine) -> None:
        self._start = self._last_epoch_end = time.perf_counter()
        self._pending = list(self.marks)

    def _check(self, engine: Engine) -> None:
        now = time.perf_counter()
        elapsed, next_end = now - self._start, 2 * now - self._last_epoch_end - self._start
        self._last_epoch_end = now
        while self._pending and next_end > 60.0 * self._pending[0]:
            self._keep_best_model(self._pending.pop(0), engine, elapsed)
        if self.minutes is not None and next_end > 60.0 * self.minutes:
            engine.terminate()

    def _keep_best_model(self, mark: float, engine: Engine, elapsed: float) -> None:
        if rank() != 0:  # only rank 0 saves the best model
            return
        if not self.best_model.is_file():  # no validation has given a finite Dice yet
            logger.warning("budget mark %g min: no best model yet (%s), nothing kept", mark, self.best_model)
            return
        snapshot = self.best_model.with_name(f"model_{mark:g}min.pt")
        shutil.copyfile(self.best_model, snapshot)
        if settings_file(self.best_model).is_file():  # the snapshot is as usable on its own as model.pt
            shutil.copyfile(settings_file(self.best_model), settings_file(snapshot))
        auxiliary = snapshot.with_name(f"auxiliary_{mark:g}min.pt")
        save_atomically({name: module.state_dict() for name, module in engine.auxiliary_networks.items()}, auxiliary)
        record_file = self.best_model.with_name("budget_marks.json")
        records = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
        records[f"{mark:g}"] = {"model": snapshot.name, "auxiliary": auxiliary.name,
                                "iteration": engine.state.iteration, "elapsed_s": round(elapsed, 1)}
        record_file.write_text(json.dumps(records, indent=1), encoding="utf-8")
        logger.info("budget mark %g min: best model so far kept as %s, the other networks of iteration %d as %s",
                    mark, snapshot, engine.state.iteration, auxiliary.name)


def epochs_for(max_iterations: int, val_interval: int) -> int:
    """Number of engine epochs when one epoch is one validation interval; the budget must divide evenly."""
    if max_iterations <= 0 or val_interval <= 0 or max_iterations % val_interval:
        raise ValueError(
            f"max_iterations ({max_iterations}) must be a positive multiple of val_interval ({val_interval})"
        )
    return max_iterations // val_interval


class DSANTrainer(Trainer):
    """DSAN training (Han et al., Eq. (1)-(12)) as an Ignite engine; see the module docstring for the
    code-to-paper symbol table.

    ``detach_translations``: Eq. (8) L_seg^s->t(E, C_i) and Eq. (10) L_adv^tp(E, C_i, D_p_i) name only E and
    C_i as their players, so by default x_s->t and x_t->s enter the segmentation sub-network detached: those
    terms train E and C_i on the translated images, not U_s / U_t. Otherwise a decoder could paint the
    labels into its translation and make Eq. (8) trivial (docs/design.md).

    Training length is ``max_epochs`` epochs of ``epoch_length`` iterations (the configs make an epoch one
    validation interval: ``epochs_for``). ``data_loader`` yields unpaired batches forever
    (``scripts.data.UnpairedBatches``). Under torchrun every rank starts from rank 0's weights, takes rank
    0's batch-norm statistics before each iteration, and steps on gradients averaged over the ranks
    (``scripts.distributed``), as DistributedDataParallel would. The engine output is a flat dict
    with one key per loss term (``loss`` is Eq. (12); ``loss_d_*`` are the discriminators' losses).

    ``running_stats`` (the paper is silent): in training, every pass of E normalises with its own batch's
    statistics; the running statistics that evaluation uses are updated by every pass ("all": x_s, x_t,
    x_s->t, x_t->s mixed, PyTorch's default) or by the x_t pass alone ("target": the deployed target segmenter
    then normalises test images as it normalised target batches in training; iterations without an x_t pass,
    such as the source warm-up, still update them from their passes). docs/budget.md measures both.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        epoch_length: int,
        data_loader: Iterable,
        segmenter: Segmenter,
        decoder_s: nn.Module,
        decoder_t: nn.Module,
        image_discriminator_s: nn.Module,
        image_discriminator_t: nn.Module,
        prediction_discriminators: Sequence[nn.Module],
        segmentation_loss: nn.Module,
        optimizer_seg: torch.optim.Optimizer,
        optimizer_dec: torch.optim.Optimizer,
        optimizer_d_image: torch.optim.Optimizer,
        optimizer_d_pred: torch.optim.Optimizer,
        translation_encoder: nn.Module | None = None,
        translated_prediction_discriminators: Sequence[nn.Module] | None = None,
        terms: Sequence[str] = TERMS,
        source_warmup: int = 0,
        lambda_rec: float = 1.0,
        lambda_adv: float = 0.01,
        lambda_gen: float = 1.0,
        lambda_seg: float = 1.0,
        lambda_secadv: float = 0.1,
        gan_mode: str = "lsgan",
        detach_translations: bool = True,
        nonfinite: str = "stop",
        running_stats: str = "all",
        amp: bool = False,
        channels_last: bool = False,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_unpaired_batch,
        handlers: Sequence | None = None,
    ) -> None:
        unknown = sorted(set(terms) - set(ALL_TERMS))
        if unknown or not terms:
            raise ValueError(f"terms must be a non-empty subset of {ALL_TERMS}, got unknown {unknown}")
        if source_warmup < 0:
            raise ValueError(f"source_warmup must be >= 0 iterations, got {source_warmup}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if running_stats not in RUNNING_STATS:
            raise ValueError(f"running_stats must be one of {RUNNING_STATS}, got {running_stats!r}")
        if gan_mode not in losses.GAN_MODES:
            raise ValueError(f"gan_mode must be one of {losses.GAN_MODES}, got {gan_mode!r}")
        self.terms = frozenset(terms)  # before the handlers attach: TranslationPreview reads it
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            handlers=handlers,
            amp=amp,
            decollate=False,
        )
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=amp)
        self.segmenter = segmenter
        self.translation_encoder = segmenter.encoder if translation_encoder is None else translation_encoder
        self.decoder_s, self.decoder_t = decoder_s, decoder_t
        # whether each decoder normalises per image (instance norm), so DSANForward may batch its two passes
        self.decoders_per_image = not (has_batch_statistics(decoder_s) or has_batch_statistics(decoder_t))
        self.image_discriminator_s, self.image_discriminator_t = image_discriminator_s, image_discriminator_t
        self.prediction_discriminators = nn.ModuleList(prediction_discriminators)
        self.translated_prediction_discriminators = (
            self.prediction_discriminators
            if translated_prediction_discriminators is None
            else nn.ModuleList(translated_prediction_discriminators)
        )
        self.segmentation_loss = segmentation_loss
        self.generator_optimizers = (optimizer_seg, optimizer_dec)
        self.discriminator_optimizers = (optimizer_d_image, optimizer_d_pred)
        self.source_warmup = source_warmup
        self.lambdas = {"rec": lambda_rec, "adv": lambda_adv, "gen": lambda_gen, "seg": lambda_seg,
                        "secadv": lambda_secadv}
        self.gan_mode = gan_mode
        self.detach_translations = detach_translations
        self.nonfinite = nonfinite
        self.running_stats = running_stats
        self.skipped_steps = 0
        self.channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        for module in self.networks:
            module.to(device=device, memory_format=memory_format)
        broadcast_from_rank_zero(self.networks)

    def run(self) -> None:
        """Ignite's run, without monai's ``Trainer.run``, which replaces ``scaler`` by a new CUDA-only scaler
        at every call: the one built here is the only scaler, and its state is in the checkpoint."""
        Workflow.run(self)

    @property
    def discriminators(self) -> list[nn.Module]:
        return [self.image_discriminator_s, self.image_discriminator_t,
                *self.prediction_discriminators, *self.translated_prediction_discriminators]

    @property
    def networks(self) -> list[nn.Module]:
        return [self.segmenter, self.translation_encoder, self.decoder_s, self.decoder_t, *self.discriminators]

    @property
    def auxiliary_networks(self) -> dict[str, nn.Module]:
        """What DSAN trains besides the segmenter (U_s, U_t, D_s, D_t, D_p, and the translation encoder where it
        is not E itself), by their names in the training checkpoint: what a stage that goes on from this run
        (self-training with Eq. (8) or the DSAN terms on) needs beside model.pt."""
        named = {"decoder_s": self.decoder_s, "decoder_t": self.decoder_t,
                 "image_discriminator_s": self.image_discriminator_s,
                 "image_discriminator_t": self.image_discriminator_t,
                 "prediction_discriminators": self.prediction_discriminators,
                 "translated_prediction_discriminators": self.translated_prediction_discriminators}
        if self.translation_encoder is not self.segmenter.encoder:
            named["translation_encoder"] = self.translation_encoder
        return named

    @property
    def active_terms(self) -> frozenset[str]:
        """The terms of Eq. (12) on at this iteration: Eq. (7) L_seg^s alone for the first ``source_warmup``
        iterations (E and C_i first learn the labelled source at a source-only iteration's cost), then ``terms``."""
        return frozenset({"seg_s"}) if self.state.iteration <= self.source_warmup else self.terms

    @property
    def running_stats_follow_target(self) -> bool:
        """True when E's running statistics come from the x_t pass alone at this iteration: ``running_stats``
        is "target" and an active term passes x_t through E (L_adv^sec, or L_gen when U reads this E)."""
        if self.running_stats != "target":
            return False
        shared = self.translation_encoder is self.segmenter.encoder
        return bool(self.active_terms & (TARGET_TERMS if shared else {"adv_sec"}))

    def _autocast(self) -> AbstractContextManager:
        return torch.autocast(torch.device(self.state.device).type, enabled=self.amp)

    def _finite(self, step_losses: dict[str, torch.Tensor]) -> bool:
        """False (after a warning) when a loss term is NaN or infinite and ``nonfinite`` is "skip", so the
        step is skipped; raises NonFiniteLossError when it is "stop". Without amp only: the gradient scaler
        already skips the steps whose gradients overflow."""
        if self.amp:
            return True
        bad = [name for name, value in step_losses.items() if not torch.isfinite(value).all()]
        if not bad:
            return True
        where = f"{', '.join(f'{n} = {float(step_losses[n])}' for n in bad)} at iteration {self.state.iteration}"
        if self.nonfinite == "stop":
            raise NonFiniteLossError(
                f"ERROR: non-finite loss: {where}. Training stopped before this step changed any weight; the last "
                "good checkpoint in output_dir is kept (rerun the command to resume from it, or set nonfinite: skip)."
            )
        self.skipped_steps += 1
        logger.warning("non-finite loss: %s; step skipped (%d so far)", where, self.skipped_steps)
        return False

    def _step(self, loss: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """One backward pass and optimiser step, through the gradient scaler (a no-op unless amp)."""
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        average_gradients(p for optimizer in optimizers for group in optimizer.param_groups for p in group["params"])
        for optimizer in optimizers:
            self.scaler.step(optimizer)

    def generator_losses(self, f: DSANForward, y_s: torch.Tensor,
                         y_t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Eq. (1)-(12) on the generator side: the terms E, C_i, U_s and U_t minimise; with self-training's
        L_seg^t on, plus lambda_seg L_seg^t against the target pseudo-labels ``y_t``."""
        lam, mode, out, terms = self.lambdas, self.gan_mode, {}, self.active_terms
        zero = torch.zeros((), device=f.x_s.device)
        if "gen_t" in terms:
            out["loss_rec_t"] = losses.reconstruction_loss(f.rec_t, f.x_t)  # Eq. (3)
            out["loss_adv_t"] = losses.image_adversarial_loss(self.image_discriminator_t, f.x_s2t, mode)  # Eq. (1)
            out["loss_gen_t"] = losses.generation_loss(out["loss_rec_t"], out["loss_adv_t"], lam["rec"], lam["adv"])
        if "gen_s" in terms:
            out["loss_rec_s"] = losses.reconstruction_loss(f.rec_s, f.x_s)  # Eq. (4)
            out["loss_adv_s"] = losses.image_adversarial_loss(self.image_discriminator_s, f.x_t2s, mode)  # Eq. (2)
            out["loss_gen_s"] = losses.generation_loss(out["loss_rec_s"], out["loss_adv_s"], lam["rec"], lam["adv"])
        if "seg_s" in terms:
            out["loss_seg_s"] = self.segmentation_loss(f.logits_s, y_s)  # Eq. (7)
        if "seg_s2t" in terms:
            out["loss_seg_s2t"] = self.segmentation_loss(f.logits_s2t, y_s)  # Eq. (8)
        if "adv_sec" in terms:
            out["loss_adv_p"] = losses.semantic_adversarial_loss(self.prediction_discriminators, f.maps("t"), mode)
            out["loss_adv_tp"] = losses.semantic_adversarial_loss(
                self.translated_prediction_discriminators, f.maps("t2s"), mode
            )
            out["loss_adv_sec"] = losses.semantic_loss(out["loss_adv_p"], out["loss_adv_tp"])  # Eq. (11)
        out["loss"] = losses.total_loss(  # Eq. (12)
            *(out.get(f"loss_{term}", zero) for term in TERMS),
            lambda_gen=lam["gen"], lambda_seg=lam["seg"], lambda_secadv=lam["secadv"],
        )
        if SELF_TRAINING_TERM in terms:
            if y_t is None:
                raise ValueError("L_seg^t (seg_t) needs pseudo-labelled target batches (configs/self_training.yaml)")
            out["loss_seg_t"] = self.segmentation_loss(f.logits_t, y_t)
            out["loss"] = out["loss"] + lam["seg"] * out["loss_seg_t"]
        return out

    def discriminator_losses(self, f: DSANForward) -> dict[str, torch.Tensor]:
        """The discriminators' side of Eq. (1), (2), (9) and (10), on detached fakes."""
        mode, out, terms = self.gan_mode, {}, self.active_terms
        if "gen_t" in terms:
            out["loss_d_t"] = losses.discriminator_loss(self.image_discriminator_t, f.x_t, f.x_s2t, mode)
        if "gen_s" in terms:
            out["loss_d_s"] = losses.discriminator_loss(self.image_discriminator_s, f.x_s, f.x_t2s, mode)
        if "adv_sec" in terms:
            out["loss_d_p"] = losses.semantic_discriminator_loss(
                self.prediction_discriminators, f.maps("s"), f.maps("t"), mode
            )
            out["loss_d_tp"] = losses.semantic_discriminator_loss(
                self.translated_prediction_discriminators, f.maps("s2t"), f.maps("t2s"), mode
            )
        return out

    def _iteration(self, engine: DSANTrainer, batchdata: dict[str, Any]) -> dict[str, torch.Tensor]:
        x_s, y_s, x_t, y_t = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        if self.channels_last:
            x_s, x_t = (None if x is None else x.contiguous(memory_format=torch.channels_last) for x in (x_s, x_t))
        for module in self.networks:
            module.train()
        broadcast_from_rank_zero(self.networks, buffers_only=True)  # no-op unless under torchrun
        f = DSANForward(self, x_s, x_t)
        generator_passes, discriminator_passes = planned_passes(self.active_terms)
        with self._autocast():
            f.run(generator_passes)
            with torch.no_grad():  # read only by the discriminator step, on the same weights as the rest
                f.run(discriminator_passes)
        f.seal()
        with frozen(self.discriminators):
            with self._autocast():
                g_losses = self.generator_losses(f, y_s, y_t)
            if self._finite(g_losses):
                self._step(g_losses["loss"], self.generator_optimizers)
        with self._autocast():
            d_losses = self.discriminator_losses(f)
        if d_losses and self._finite(d_losses):
            self._step(sum(d_losses.values()), self.discriminator_optimizers)
        self.scaler.update()
        return {**{name: value.detach() for name, value in {**g_losses, **d_losses}.items()},
                **translation_distances(f)}
