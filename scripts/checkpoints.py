"""Checkpoints: resume from the newest full-state checkpoint, and the RNG state that goes into it."""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch import nn

from scripts.validation import InputError

logger = logging.getLogger("dsan")

CHECKPOINT_PATTERN = re.compile(r"checkpoint_epoch=(\d+)\.pt$")


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The full-state checkpoint of the highest epoch that CheckpointSaver wrote into ``directory``."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("checkpoint_epoch=*.pt")
             if (m := CHECKPOINT_PATTERN.search(p.name))]
    return max(found)[1] if found else None


class RNGState:
    """The Python, NumPy and torch random generators as a checkpointable object, so a resumed run
    draws the same crops and rotations as an uninterrupted one would."""

    def state_dict(self) -> dict[str, Any]:
        _, keys, pos, has_gauss, cached = np.random.get_state()
        version, py_state, gauss_next = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_scalars": torch.tensor([pos, has_gauss], dtype=torch.int64),
            "numpy_cached_gaussian": torch.tensor(cached, dtype=torch.float64),
            "python": torch.tensor(py_state, dtype=torch.int64),
            "python_meta": torch.tensor([version, -1 if gauss_next is None else 1], dtype=torch.int64),
            "python_gauss_next": torch.tensor(0.0 if gauss_next is None else gauss_next, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        pos, has_gauss = state["numpy_scalars"].tolist()
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                             float(state["numpy_cached_gaussian"])))
        version, has_next = state["python_meta"].tolist()
        gauss_next = float(state["python_gauss_next"]) if has_next == 1 else None
        random.setstate((version, tuple(state["python"].tolist()), gauss_next))


class ResumeFromLatest:
    """At start, load the newest full-state checkpoint in ``directory`` into ``load_dict`` (every network,
    optimiser, the scaler, the engine's iteration counter and the RNG state), if there is one."""

    def __init__(self, directory: str | os.PathLike, load_dict: dict, map_location: Any = None) -> None:
        self.directory = directory
        self.load_dict = load_dict
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        ensure_writable(self.directory)
        path = latest_checkpoint(self.directory)
        if path is None:
            logger.info("no checkpoint in %s: training from scratch", self.directory)
            return
        logger.info("resuming from %s", path)
        CheckedCheckpointLoader(load_path=str(path), load_dict=self.load_dict,
                                map_location=self.map_location).attach(engine)


class ValidationState:
    """The validation side of a resumable run: the evaluator's best metric and the best-model saver's record
    of what it kept, so a resumed run replaces models/model.pt only with a better model."""

    def __init__(self, evaluator: Engine, best_model_saver: CheckpointSaver) -> None:
        self.evaluator = evaluator
        self.best_model_saver = best_model_saver

    def _tracker(self) -> Checkpoint | None:
        return self.best_model_saver._key_metric_checkpoint  # MONAI keeps ignite's Checkpoint here

    def state_dict(self) -> dict[str, Any]:
        tracker = self._tracker()
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
            "saved": [] if tracker is None else [[float(p), str(f)] for p, f in tracker.state_dict()["_saved"]],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        tracker = self._tracker()
        if tracker is not None:
            tracker.load_state_dict({"_saved": [tuple(item) for item in state["saved"]]})


class CheckpointMismatchError(SystemExit):
    """A checkpoint that does not fit the network built from the config: one message, no traceback."""


def check_state_dict_fits(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointMismatchError listing the keys that are missing, unexpected or of another shape."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
                      for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or reshaped:
        def listing(title: str, items: list[str]) -> str:
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")

        raise CheckpointMismatchError(
            f"ERROR: {source} does not fit the {type(module).__name__} built from the config (another architecture "
            "or width? encoder_width, num_classes, decoder_channels, decoder_upsampling and discriminator_channels "
            "must match the training run)."
            + (listing("missing keys", missing) if missing else "")
            + (listing("unexpected keys", unexpected) if unexpected else "")
            + (listing("shape mismatches", reshaped) if reshaped else "")
        )


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's CheckpointLoader (torch.load with weights_only=True) that first checks every network's keys
    and shapes, so a checkpoint of another architecture or width stops with a list of the mismatches."""

    def __call__(self, engine: Engine) -> None:
        checkpoint = torch.load(self.load_path, map_location=self.map_location, weights_only=True)
        single = len(self.load_dict) == 1 and next(iter(self.load_dict)) not in checkpoint
        for name, obj in self.load_dict.items():
            if isinstance(obj, nn.Module):
                check_state_dict_fits(obj, checkpoint if single else checkpoint.get(name, {}),
                                      f"{self.load_path}" + ("" if single else f" [{name}]"))
        super().__call__(engine)


class CheckpointWriteError(SystemExit):
    """A checkpoint that could not be written (full disk, unwritable folder): one message, no traceback."""


# ---- model.json: what a saved model was trained with ---------------------------------------------------

def initialised_from(network: nn.Module, model: str | os.PathLike | None) -> nn.Module:
    """``network`` with the weights of ``model`` (a model.pt state dict), checked to fit: where a stage starts
    from a trained model (self-training's --init_ckpt)."""
    if model is None:
        raise InputError("init_ckpt is not set: self-training starts from a trained model, e.g. "
                         "--init_ckpt runs/demo/dsan/model.pt")
    if not Path(model).is_file():
        raise InputError(f"init_ckpt {str(model)!r} does not exist: pass the model.pt a training run wrote.")
    state = torch.load(model, map_location="cpu", weights_only=True)
    check_state_dict_fits(network, state, f"init_ckpt {str(model)!r}")
    network.load_state_dict(state)
    return network


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """``write`` a temporary file beside ``path``, then rename it into place: a reader never sees half a file and a
    kill mid-write leaves the old one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def save_atomically(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """torch.save ``state`` to ``path`` (``write_atomically``)."""
    write_atomically(path, lambda temporary: torch.save(dict(state), temporary))


TRANSLATING_TERMS = frozenset({"gen_t", "gen_s", "seg_s2t", "adv_sec"})
"""The terms of Eq. (12) that read U_s, U_t or a discriminator: Eq. (5), (6), (8) and (11)."""


def check_auxiliary_ckpt(path: str | os.PathLike | None, terms: Sequence[str]) -> None:
    """Before anything is built (self-training labels the target first): the stage's ``terms`` that read U_s, U_t
    or a discriminator have them in ``path``, an existing file. Eq. (8) on the x_s->t of an untrained U_t would
    teach the segmenter noise."""
    if path is None:
        translating = sorted(TRANSLATING_TERMS & set(terms))
        if translating:
            raise InputError(f"terms {translating} read the decoders and discriminators of the DSAN run this stage "
                             "goes on from: pass them as --init_auxiliary_ckpt (auxiliary_<m>min.pt of a budget "
                             "mark, or the run's checkpoint_epoch=N.pt).")
    elif not Path(path).is_file():
        raise InputError(f"init_auxiliary_ckpt {str(path)!r} does not exist: pass a budget mark's "
                         "auxiliary_<m>min.pt or a training run's checkpoint_epoch=N.pt.")


def load_auxiliary_networks(path: str | os.PathLike | None, networks: Mapping[str, nn.Module]) -> None:
    """Load a stage's ``networks`` (``DSANTrainer.auxiliary_networks``: U_s, U_t, the discriminators) from ``path``,
    a budget mark's ``auxiliary_<m>min.pt`` or a training checkpoint (``checkpoint_epoch=N.pt``, whose entries
    have the same names), each checked to fit; without ``path`` they stay as built."""
    if path is None:
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    absent = sorted(set(networks) - set(state))
    if absent:
        raise InputError(f"init_auxiliary_ckpt {str(path)!r} holds no {absent}: is it a DSAN training checkpoint?")
    for name, module in networks.items():
        check_state_dict_fits(module, state[name], f"init_auxiliary_ckpt {str(path)!r} [{name}]")
        module.load_state_dict(state[name])
    logger.info("loaded %s from %s", ", ".join(networks), path)


def settings_file(model: str | os.PathLike) -> Path:
    """The sidecar of a model file (``model.json`` beside ``model.pt``): model.pt itself stays a plain state dict,
    as Model Zoo tools (ckpt_export, verify_net_in_out) expect."""
    return Path(model).with_suffix(".json")


def write_model_settings(model: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Write ``settings`` to the sidecar of ``model`` through a temporary file and a rename, so a reader never
    sees half a file."""
    write_atomically(settings_file(model),
                     lambda temporary: temporary.write_text(json.dumps(dict(settings), indent=1), encoding="utf-8"))


def read_model_settings(model: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of ``model`` (empty when there is none: a model saved before sidecars existed)."""
    path = settings_file(model)
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{str(path)!r}, the settings of model {str(model)!r}, is not valid JSON ({e}).") from None
    if not isinstance(settings, dict):
        raise InputError(f"{str(path)!r}, the settings of model {str(model)!r}, must be a JSON object.")
    return settings


def model_setting(model: str | os.PathLike | None, key: str, bundle_root: str | os.PathLike) -> Any:
    """The ``key`` the model was trained with (its sidecar), else (no sidecar, or no model) configs/train.yaml's
    default: how inference.yaml and evaluate.yaml take a model's network and slicing from ``--ckpt_path`` alone."""
    settings = {} if model is None else read_model_settings(model)
    if key in settings:
        return settings[key]
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_file(Path(bundle_root) / "configs" / "train.yaml")[key]


def check_model(model: str | os.PathLike | None, settings: Mapping[str, Any]) -> None:
    """Before anything is built: ``model`` exists, and every one of ``settings`` (the values the config ended with,
    overrides included) agrees with what the model was trained with. One InputError otherwise; no model (an
    evaluation given none) has nothing to check."""
    if model is None:
        return
    if not Path(model).is_file():
        raise InputError(f"ckpt_path {str(model)!r} does not exist: pass the model.pt that training wrote "
                         "(in ckpt_dir, models/ by default; output_dir for the CPU profiles' runs).")
    trained = read_model_settings(model)
    contradicted = [f"--{key} {settings[key]!r} but the model was trained with {trained[key]!r}"
                    for key in settings if key in trained and json.loads(json.dumps(settings[key])) != trained[key]]
    if contradicted:
        raise InputError(f"{'; '.join(contradicted)} ({settings_file(model)}). Drop the override: the model's "
                         "own settings are used.")


class _ReportingDiskSaver(BaseSaveHandler):
    """Wraps ignite's DiskSaver: writes atomically, deletes the checkpoint that n_saved no longer keeps only
    after the new one is safely written (ignite asks for the removal first), and turns an OSError into a
    CheckpointWriteError. With ``model_settings``, each file written gets that sidecar (``write_model_settings``)."""

    def __init__(self, saver: Any, model_settings: Mapping[str, Any] | None = None) -> None:
        saver._atomic = True  # MONAI turns it off; ignite's temp-file-and-rename is what keeps old files intact
        self.saver = saver
        self.model_settings = model_settings
        self._to_remove: list[str] = []

    def __call__(self, checkpoint: Any, filename: str, metadata: Any = None) -> None:
        try:
            self.saver(checkpoint, filename, metadata)
            if self.model_settings is not None:  # MONAI's fixed-name saver writes model.pt whatever ignite names it
                written = getattr(self.saver, "filename", None) or filename
                write_model_settings(Path(self.saver.dirname) / written, self.model_settings)
        except OSError as error:
            raise CheckpointWriteError(
                f"ERROR: could not write checkpoint {filename} in {self.saver.dirname}: {error}. Nothing was "
                "replaced: the checkpoints already there are intact, and a rerun resumes from the newest."
            ) from error
        for old in self._to_remove:
            self.saver.remove(old)
        self._to_remove.clear()

    def remove(self, filename: str) -> None:
        if getattr(self.saver, "filename", None) is not None:
            return  # MONAI's fixed-name saver (models/model.pt): the atomic rename itself replaces the old file
        self._to_remove.append(filename)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.saver, name)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's CheckpointSaver writing each file to a temporary name and renaming it into place (ignite's
    atomic DiskSaver, which also keeps group/other read permission), so a kill, a full disk or an I/O error
    mid-write never leaves a truncated checkpoint and the previous one stays intact; a failed write ends the
    run with one message saying what happened. ``model_settings`` (train.yaml's) go into a sidecar beside each
    file saved (``model.json`` beside ``model.pt``), which inference reads to rebuild and feed the network."""

    def __init__(self, *args: Any, model_settings: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _ReportingDiskSaver(checkpoint.save_handler, model_settings)


def ensure_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove a file can be written there, before any training starts."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CheckpointWriteError(f"ERROR: output folder {str(path)!r} is not writable: {error}") from error
    return path
