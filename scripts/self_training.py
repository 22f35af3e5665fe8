"""Re-labelling rounds of self-training (CBST's rounds, Zou et al., ECCV 2018): round 1 is the self_training
workflow from ``--init_ckpt``; every later round labels the target training images again with the best model
of the round before and trains from that model on the new pseudo-labels.

    python -m scripts self_training_rounds --rounds 3 --output_dir runs/self_training_rounds \\
        --config_file "['configs/train.yaml','configs/cpu.yaml','configs/demo.yaml','configs/self_training.yaml']" \\
        --init_ckpt runs/demo/dsan/model.pt --init_auxiliary_ckpt runs/demo/dsan/checkpoint_epoch=6.pt --max_minutes 5

Each round is one ``monai.bundle run self_training`` into ``<output_dir>/round_<r>`` with the budget given
(per round); a round that finished writes ``round.json`` there, so a rerun after a kill skips the finished
rounds and resumes the interrupted one as training resumes. ``rounds.json`` in ``output_dir`` lists every
round's model, iterations, wall time and pseudo-label quality (where target_train_labels exist), which also go
to TensorBoard there (``pseudo_labels/<precision|share_of_class|kept>/<class>`` at step r); the last round's
model is copied to ``<output_dir>/model.pt`` with its model.json.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import run

from scripts.checkpoints import settings_file
from scripts.pseudo_labels import MANIFEST
from scripts.reporting import read_history

logger = logging.getLogger("dsan")

ROUND_RECORD = "round.json"
ROUNDS_RECORD = "rounds.json"


def round_record(round_dir: Path, index: int, init_ckpt: Path, wall_s: float) -> dict:
    """What one finished round did: the model it started from, its best model, iterations, wall time, and its
    pseudo-labels' thresholds, kept pixels and (where target labels exist) quality."""
    manifest = json.loads((round_dir / "pseudo_labels" / MANIFEST).read_text(encoding="utf-8"))
    history = read_history(round_dir / "validation.json")
    return {"round": index, "init_ckpt": str(init_ckpt), "model": str(round_dir / "model.pt"),
            "iterations": history[-1]["iteration"] if history else 0, "wall_s": round(wall_s, 1),
            "share": manifest["share"], "thresholds": manifest["thresholds"],
            "kept_pixels": manifest["kept_pixels"], "quality": manifest.get("quality")}


def log_round_quality(writer: object, record: dict) -> None:
    """One round's pseudo-label statistics as TensorBoard scalars at step ``round`` and as one log line."""
    for name, kept in record["kept_pixels"].items():
        writer.add_scalar(f"pseudo_labels/kept/{name}", kept, record["round"])
    for name, quality in (record["quality"] or {}).items():
        for key in ("precision", "share_of_class"):
            if quality[key] is not None:
                writer.add_scalar(f"pseudo_labels/{key}/{name}", quality[key], record["round"])
    writer.flush()
    scores = "" if record["quality"] is None else "; precision / share of class: " + ", ".join(
        f"{name} {_percent(q['precision'])} / {_percent(q['share_of_class'])}"
        for name, q in record["quality"].items())
    logger.info("self-training round %d: %d iterations in %.0f s from %s%s", record["round"], record["iterations"],
                record["wall_s"], record["init_ckpt"], scores)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def copy_model(model: Path, destination: Path) -> None:
    """``model`` and its model.json to ``destination`` (and its sidecar), each through a temporary file."""
    for source, target in ((model, destination), (settings_file(model), settings_file(destination))):
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)


def train_in_rounds(config_file: str | Sequence[str], init_ckpt: str, output_dir: str, rounds: int = 2,
                    **overrides: object) -> list[dict]:
    """Run ``rounds`` rounds of the self_training workflow of ``config_file``, each from the best model of the
    round before (the first from ``init_ckpt``), into ``<output_dir>/round_<r>``; return their records (also
    ``rounds.json``). ``overrides`` (config ids, e.g. ``max_minutes``) apply to every round."""
    if int(rounds) != rounds or rounds < 1:
        raise SystemExit(f"ERROR: rounds must be a whole number of at least 1, got {rounds}")
    from torch.utils.tensorboard import SummaryWriter

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model, records = Path(init_ckpt).resolve(), []
    with SummaryWriter(str(out)) as writer:
        for index in range(1, int(rounds) + 1):
            round_dir = out / f"round_{index}"
            done = round_dir / ROUND_RECORD
            if done.is_file():
                record = json.loads(done.read_text(encoding="utf-8"))
                logger.info("self-training round %d already finished: reusing %s", index, round_dir)
            else:
                start = time.perf_counter()
                run("self_training", config_file=config_file, init_ckpt=str(model), output_dir=str(round_dir),
                    ckpt_dir=str(round_dir), **overrides)
                record = round_record(round_dir, index, model, time.perf_counter() - start)
                temporary = done.with_name(f".{done.name}.{os.getpid()}.tmp")
                temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
                os.replace(temporary, done)  # a kill never leaves half a record that would skip the round
                log_round_quality(writer, record)
            records.append(record)
            model = Path(record["model"])
    copy_model(model, out / "model.pt")
    (out / ROUNDS_RECORD).write_text(json.dumps(records, indent=1), encoding="utf-8")
    return records
