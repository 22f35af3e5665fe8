"""Checkpoints: resume from the newest full-state checkpoint, and the RNG state that goes into it."""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader

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
        path = latest_checkpoint(self.directory)
        if path is None:
            logger.info("no checkpoint in %s: training from scratch", self.directory)
            return
        logger.info("resuming from %s", path)
        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=self.map_location).attach(engine)
