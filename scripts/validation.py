"""Up-front input validation: every fault in the data or the command line stops the run before any engine
starts, with one message that names the file (or the config id) and the fault, and no traceback.

What is checked, where, and example messages: docs/guards.md.

- ``validate_datalist``: every file of a datalist (``scripts.data.check_dataset`` calls it) exists, is a
  readable (not corrupt, not truncated), non-empty, 3D single-channel volume with finite values; labels hold
  only class indices ``0 .. num_classes - 1``; an image and its label have the same shape.
- ``check_volumes``: the same for inference inputs (``scripts.inference.list_volumes(..., validate=True)``).
- ``check_override_ids``: every id given to ``monai.bundle run`` is defined by the config files it runs
  (MONAI silently adds unknown ids, so ``--max_iteration 10`` would otherwise train 20000 iterations).

Faults raise ``InputError``, a ``SystemExit``: ``monai.bundle run`` ends with its text and exit status 1.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("dsan")

NIFTI_SUFFIXES = (".nii.gz", ".nii")  # in the order a folder is searched for <stem><suffix>
MAX_LISTED = 10  # missing files / faults listed in one message (and faults collected before stopping)
LOG_EVERY = 20  # a progress line every this many volumes read
# the files of each split that training and validation read; target_train labels are never read
# (target labels are optional: without them models are selected label-free, scripts/selection.py)
SPLIT_KEYS = {"source_train": ("image", "label"), "target_train": ("image",), "target_val": ("image",),
              "target_test": ("image",), "source_test": ("image", "label")}
OPTIONAL_LABEL_SPLITS = ("target_val", "target_test")
REQUIRED_SPLITS = ("source_train", "target_train")
# every split a datalist may hold (docs/data.md), in the order scripts.prepare writes them
SPLITS = (*REQUIRED_SPLITS, "target_val", "target_test", "source_test", "target_train_labels")
# arguments of monai.bundle's `run` (and of the workflow it creates) that are not config ids
RUN_ARGS = frozenset({"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking",
                      "args_file", "workflow_name", "workflow_type", "properties_path"})


class InputError(SystemExit):
    """A fault in the inputs, found before any engine starts: a message starting with ``ERROR: ``, not a
    traceback (a SystemExit subclass, so ``monai.bundle run`` ends with the text and exit status 1)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"ERROR: {problem}")
        self.problem = problem


# ---- one volume ---------------------------------------------------------------------------------------

def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _describe(path: str, role: str) -> str:
    return f"{role} {path!r}"


def _unreadable(path: str, role: str, error: BaseException) -> InputError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    fault = ("the file is corrupt or truncated" if is_nifti(path)
             else "MONAI's LoadImage, the reader training and inference use, fails on it")
    return InputError(f"{_describe(path, role)} cannot be read: {fault} "
                      f"({type(error).__name__}{': ' + reason if reason else ''}).")


def header_shape(path: str | os.PathLike, role: str = "image") -> tuple[int, ...] | None:
    """The array shape from a NIfTI header alone (cheap); None for other formats, whose shape is known only
    once read. Raises InputError when the header cannot be read."""
    if not is_nifti(path):
        return None
    import nibabel as nib

    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as e:  # nibabel raises ImageFileError, HeaderDataError, OSError, EOFError, ...
        raise _unreadable(str(path), role, e) from None


def spatial_shape(path: str | os.PathLike, shape: Sequence[int], role: str = "image") -> tuple[int, int, int]:
    """The 3D shape of a volume of array shape ``shape``; raises InputError for an empty volume (a zero-size
    axis) and for one that is not 3D single-channel (trailing axes of size 1 beyond the third are fine)."""
    shape = tuple(int(s) for s in shape)
    if any(s == 0 for s in shape):
        raise InputError(f"{_describe(str(path), role)} is empty: its shape {shape} has a zero-size axis.")
    spatial = shape
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial = spatial[:-1]
    if len(spatial) > 3:
        raise InputError(f"{_describe(str(path), role)} has shape {shape}: a 4D or multi-channel volume where one "
                         "channel is expected (a trailing axis of size 1 is fine). Split it into single-channel "
                         "3D files.")
    if len(spatial) < 3:
        raise InputError(f"{_describe(str(path), role)} has shape {shape}: a 3D volume is expected.")
    return spatial  # type: ignore[return-value]


def read_volume(path: str | os.PathLike, role: str = "image") -> np.ndarray:
    """Every voxel of a volume (which is what detects a truncated or corrupt file); NIfTI through nibabel,
    other formats through MONAI's ``LoadImage`` (the reader training uses). Raises InputError on failure."""
    try:
        if is_nifti(path):
            import nibabel as nib

            proxy = nib.load(str(path)).dataobj
            if role == "image" and np.issubdtype(proxy.dtype, np.integer):
                return np.asarray(proxy.get_unscaled())  # no float copy: integers hold no NaN, min/max suffice
            return np.asanyarray(proxy)
        from monai.transforms import LoadImage

        return np.asarray(LoadImage(image_only=True)(str(path)))
    except Exception as e:
        raise _unreadable(str(path), role, e) from None


def _values(values: np.ndarray) -> str:
    shown = [int(v) if float(v).is_integer() else float(v) for v in values[:MAX_LISTED]]
    return str(shown) + (f" and {len(values) - MAX_LISTED} more" if len(values) > MAX_LISTED else "")


def _voxels(n: int) -> str:
    return f"{n} voxel{'' if n == 1 else 's'}"


def check_values(path: str | os.PathLike, data: np.ndarray, role: str = "image",
                 num_classes: int | None = None) -> None:
    """Raise InputError when an image holds NaN or infinite voxels or is constant (a blank export), or a label
    holds NaN, non-integer values or values outside ``0 .. num_classes - 1``."""
    what = _describe(str(path), role)
    lo, hi = data.min(), data.max()  # NaN propagates through min and max: one cheap pass each
    if not (math.isfinite(lo) and math.isfinite(hi)):
        nan = int(np.count_nonzero(np.isnan(data)))
        if nan == data.size:
            raise InputError(f"{what} is all NaN.")
        bad = data.size - int(np.count_nonzero(np.isfinite(data)))
        raise InputError(f"{what} has {_voxels(bad)} that are NaN or infinite (of {data.size}).")
    if role == "image":
        if lo == hi:
            raise InputError(f"{what} is constant (every voxel is {lo.item()!r}): a blank or failed export?")
        return
    if data.dtype.kind not in "biu":  # bool and integer labels are class indices already
        fractional = data != np.rint(data)
        if fractional.any():
            raise InputError(f"{what} has non-integer values {_values(np.unique(data[fractional]))}: a label "
                             "holds class indices.")
    if num_classes is not None and (lo < 0 or hi > num_classes - 1):
        outside = (data < 0) | (data > num_classes - 1)
        raise InputError(f"{what} has values {_values(np.unique(data[outside]))} outside 0..{num_classes - 1} "
                         f"(num_classes {num_classes}) in {_voxels(int(np.count_nonzero(outside)))}; labels are "
                         "class indices 0..num_classes-1 (docs/data.md).")


def check_volume(path: str | os.PathLike, role: str = "image", num_classes: int | None = None) -> tuple[int, int, int]:
    """Check one volume fully (header, every voxel, values); return its 3D shape. Raises InputError."""
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{_describe(path, role)} does not exist.")
    shape = header_shape(path, role)
    if shape is not None:
        spatial_shape(path, shape, role)  # before reading: a 0-size or 4D header fails fast
    data = read_volume(path, role)
    spatial = spatial_shape(path, data.shape, role)
    check_values(path, data, role, num_classes)
    return spatial


def _raise_faults(faults: list[str], where: str, stopped: bool = False) -> None:
    """One InputError for all ``faults`` (the first MAX_LISTED listed); ``stopped``: checking ended early."""
    if len(faults) == 1 and not stopped:
        raise InputError(faults[0])
    if faults:
        listed = "\n".join(f"  - {f}" for f in faults[:MAX_LISTED])
        more = f"\n  ... and {len(faults) - MAX_LISTED} more" if len(faults) > MAX_LISTED else ""
        more += f"\n  ... (checking stopped after {len(faults)} problems)" if stopped else ""
        count = f"{len(faults)}{'+' if stopped else ''}"
        raise InputError(f"{count} problems in {where}:\n{listed}{more}")


def _check_all(files: Sequence[tuple[str, str]], num_classes: int | None, where: str,
               log_every: int = LOG_EVERY) -> dict[str, tuple[int, int, int]]:
    """check_volume on each (path, role); one InputError listing the faults (stops after MAX_LISTED); the
    3D shape of each path otherwise. Logs progress every ``log_every`` volumes."""
    start = time.perf_counter()
    shapes: dict[str, tuple[int, int, int]] = {}
    faults: list[str] = []
    for n, (path, role) in enumerate(files, 1):
        try:
            shapes[path] = check_volume(path, role, num_classes)
        except InputError as e:
            faults.append(e.problem)
            if len(faults) >= MAX_LISTED and n < len(files):
                _raise_faults(faults, where, stopped=True)
        if log_every and n % log_every == 0 and n < len(files):
            logger.info("checking %s: %d/%d volumes read (%.1f s)", where, n, len(files), time.perf_counter() - start)
    _raise_faults(faults, where)
    return shapes


def check_volumes(paths: Iterable[str | os.PathLike], log_every: int = LOG_EVERY) -> None:
    """Inference inputs: each volume readable in full, not empty, finite, not constant, 3D single-channel.
    Raises one InputError naming every faulty file (up to MAX_LISTED)."""
    start = time.perf_counter()
    files = [(str(p), "image") for p in paths]
    _check_all(files, None, "the input volumes", log_every)
    logger.info("input check: %d volumes are readable, 3D single-channel and finite (%.1f s)", len(files),
                time.perf_counter() - start)


# ---- a datalist ---------------------------------------------------------------------------------------

def read_datalist(datalist: str | os.PathLike) -> dict:
    """The datalist JSON as a dict; InputError when it is not valid JSON or not an object."""
    try:
        with open(datalist, encoding="utf-8") as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"datalist {str(datalist)!r} is not valid JSON ({e}).") from None
    if not isinstance(entries, dict):
        raise InputError(f"datalist {str(datalist)!r} must be a JSON object of splits (docs/data.md), "
                         f"not a {type(entries).__name__}.")
    return entries


@dataclass
class _Entry:
    split: str
    index: int
    image: str
    label: str | None = None


def _entries(datalist: str | os.PathLike, dataset_dir: str | os.PathLike) -> list[_Entry]:
    """The entries training reads, paths resolved as ``read_split`` (MONAI's ``load_decathlon_datalist``)
    resolves them; InputError on a malformed split or entry."""
    content = read_datalist(datalist)
    name = str(datalist)
    empty = [split for split in REQUIRED_SPLITS if not content.get(split)]
    if empty:
        raise InputError(f"datalist {name!r} has no entries for {empty}.")
    entries, faults = [], []
    for split, keys in SPLIT_KEYS.items():
        items = content.get(split)
        if items is None:
            continue
        if not isinstance(items, list):
            faults.append(f"split {split!r} of datalist {name!r} must be a list of entries, "
                          f"not a {type(items).__name__}.")
            continue
        for i, item in enumerate(items):
            labelled = split in OPTIONAL_LABEL_SPLITS and isinstance(item, dict) and "label" in item
            needed = (*keys, "label") if labelled else keys
            paths = {k: item.get(k) for k in needed} if isinstance(item, dict) else {}
            bad = [k for k in needed if not isinstance(paths.get(k), str) or not paths[k]]
            if bad:
                faults.append(f"entry {i} of split {split!r} in datalist {name!r} needs {' and '.join(needed)} as "
                              f"one file path each (bad or missing: {bad}): {item!r}")
                continue
            resolved = {k: os.path.normpath(os.path.join(str(dataset_dir), p)) for k, p in paths.items()}
            entries.append(_Entry(split, i, resolved["image"], resolved.get("label")))
    _raise_faults(faults, f"datalist {name!r}")
    return entries


def _mismatches(entries: Iterable[_Entry], shapes: Mapping[str, tuple[int, ...] | None]) -> list[str]:
    faults = []
    for e in entries:
        if e.label is None:
            continue
        image, label = shapes.get(e.image), shapes.get(e.label)
        if image is not None and label is not None and tuple(image) != tuple(label):
            faults.append(f"entry {e.index} of split {e.split!r}: image {e.image!r} has shape {tuple(image)} but "
                          f"its label {e.label!r} has shape {tuple(label)}; they must match.")
    return faults


def validate_datalist(dataset_dir: str | os.PathLike, datalist: str | os.PathLike, num_classes: int | None = None,
                      log_every: int = LOG_EVERY) -> int:
    """Check every file training reads from ``datalist`` (source_train images and labels, target_train
    images, target_val and, if present, target_test images and labels) before anything is built:

    1. the splits are well formed and every listed file exists (all missing files are counted, 10 listed);
    2. from the NIfTI headers alone: no empty or 4D / multi-channel volume, image and label shapes match;
    3. every voxel of every volume is read (detects corrupt and truncated files): images finite and not
       constant, labels integer and (given ``num_classes``) in ``0 .. num_classes - 1``; a progress line
       every ``log_every`` volumes.

    Each stage raises one InputError naming each faulty file (up to 10); returns the number of volumes read.
    """
    start = time.perf_counter()
    name = str(datalist)
    entries = _entries(datalist, dataset_dir)
    files = list(dict.fromkeys([(e.image, "image") for e in entries]
                               + [(e.label, "label") for e in entries if e.label is not None]))
    paths = list(dict.fromkeys(p for p, _ in files))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        listed = "\n".join(f"  {p}" for p in missing[:MAX_LISTED])
        more = f"\n  ... and {len(missing) - MAX_LISTED} more" if len(missing) > MAX_LISTED else ""
        raise InputError(f"{len(missing)} of the {len(paths)} files listed in datalist {name!r} do not exist "
                         f"(relative paths are resolved against dataset_dir {str(dataset_dir)!r}):\n{listed}{more}")

    shapes: dict[str, tuple[int, ...] | None] = {}
    faults = []
    for path, role in files:
        try:
            shape = header_shape(path, role)
            shapes[path] = None if shape is None else spatial_shape(path, shape, role)
        except InputError as e:
            faults.append(e.problem)
    _raise_faults(faults + _mismatches(entries, shapes), f"datalist {name!r}")

    read = _check_all(files, num_classes, f"datalist {name!r}", log_every)
    _raise_faults(_mismatches(entries, read), f"datalist {name!r}")  # shapes of non-NIfTI files, known only now
    labels = f", labels in 0..{num_classes - 1}" if num_classes is not None else ""
    logger.info("input check: the %d volumes of %d entries in %s are readable, 3D single-channel and finite%s "
                "(%.1f s)", len(files), len(entries), name, labels, time.perf_counter() - start)
    return len(files)


# ---- command-line ids -------------------------------------------------------------------------------

def _config_paths(config_file: Any) -> list[str]:
    """The files of a ``config_file`` argument as MONAI reads it: a path, a comma-separated string of paths,
    or a sequence of paths."""
    if isinstance(config_file, (str, os.PathLike)):
        text = str(config_file)
        if not Path(text).is_file() and "," in text:
            return [p.strip() for p in text.split(",")]
        return [text]
    return [str(p) for p in config_file]


def config_ids(config_file: Any) -> set[str]:
    """The top-level ids the config file(s) define (the first component of ``a#b`` keys); a dict counts as
    an already-loaded config."""
    from monai.bundle import ConfigParser

    if config_file is None:
        return set()
    if isinstance(config_file, Mapping):
        return {str(k).split("#")[0] for k in config_file}
    ids: set[str] = set()
    for path in _config_paths(config_file):
        ids |= {str(k).split("#")[0] for k in ConfigParser.load_config_file(path)}
    return ids


def _merged_config(config_file: Any) -> dict[str, Any]:
    """The config files of a run merged as MONAI merges them (later files win)."""
    from monai.bundle import ConfigParser

    return ConfigParser.load_config_files(_config_paths(config_file))


def tracking_ids(tracking: Any) -> set[str]:
    """The ids a ``--tracking`` setting adds to the config (its ``configs`` section)."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    if tracking is None:
        return set()
    if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
        settings = DEFAULT_EXP_MGMT_SETTINGS[tracking]
    else:
        settings = ConfigParser.load_config_files(tracking)
    return set(settings.get("configs", {}))


def check_ids(ids: Iterable[str], known: Iterable[str], config_files: Sequence[str] = ()) -> None:
    """Raise InputError listing each id (checked on its first ``#`` component) that is not in ``known``,
    with the closest known ids as suggestions."""
    known = set(known)
    unknown = list(dict.fromkeys(i for i in ids if str(i).split("#")[0] not in known))
    if not unknown:
        return
    described = []
    for i in unknown:
        close = difflib.get_close_matches(str(i).split("#")[0], sorted(known), n=3, cutoff=0.6)
        described.append(f"{i!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    files = f" ({', '.join(config_files)})" if config_files else ""
    plural = "s" if len(unknown) > 1 else ""
    raise InputError(f"unknown config id{plural} {', '.join(described)}: no config file given{files} defines "
                     f"{'them' if plural else 'it'}, so MONAI would add {'them' if plural else 'it'} silently and "
                     "nothing would change. Check the spelling (ids: README.md, configs/*.yaml).")


@dataclass
class RunCall:
    """What ``monai.bundle run`` was given: its config file(s), tracking setting, override ids and their values."""

    config_file: Any
    tracking: Any = None
    overrides: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


def _with_args_file(config_file: Any, tracking: Any, overrides: Mapping[str, Any], args_file: Any) -> RunCall:
    """Merge an ``args_file`` the way MONAI does: its entries are defaults, the explicit arguments win."""
    values = dict(overrides)
    if args_file is not None:
        from monai.bundle import ConfigParser

        args = ConfigParser.load_config_file(str(args_file))
        config_file = args.get("config_file") if config_file is None else config_file
        tracking = args.get("tracking") if tracking is None else tracking
        values = {**args, **values}
    values = {k: v for k, v in values.items() if k not in RUN_ARGS}
    return RunCall(config_file, tracking, list(values), values)


def run_call_from_stack() -> RunCall | None:
    """The arguments of the innermost ``monai.bundle.run`` call on the stack (command line, torchrun or Python
    API alike: Fire calls the same function), or None when there is none (a workflow built directly)."""
    from monai.bundle import scripts as bundle_scripts

    code = getattr(getattr(bundle_scripts, "run", None), "__code__", None)
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code is code:
                args = frame.f_locals
                if not {"config_file", "override"} <= set(args):
                    return None  # a MONAI whose `run` names its arguments differently
                return _with_args_file(args["config_file"], args.get("tracking"), args["override"],
                                       args.get("args_file"))
            frame = frame.f_back
        return None
    finally:
        del frame


def run_call_from_argv(argv: Sequence[str]) -> RunCall | None:
    """The same from a ``python -m monai.bundle run ...`` command line (Fire's ``--id value``, ``--id=value``
    and ``--flag`` forms; hyphens read as underscores); None for any other command line."""
    if len(argv) < 2 or argv[1] != "run" or not str(argv[0]).replace("\\", "/").endswith("monai/bundle/__main__.py"):
        return None
    values: dict[str, Any] = {}
    i = 2
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and len(token) > 2:
            key, eq, value = token[2:].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            values[key.replace("-", "_")] = value
        i += 1

    def literal(text: Any) -> Any:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError):
            return text

    config_file = values.get("config_file")
    return _with_args_file(None if config_file is None else literal(config_file), values.get("tracking"),
                           values, values.get("args_file"))


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """The raw value of a (possibly nested, ``a#b``) id in a loaded config; None where it has none."""
    node: Any = config
    for part in key.split("#"):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def check_boolean_overrides(values: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Raise InputError for a boolean id given as the text "true" / "false": Fire, behind the monai.bundle command
    line, turns only Python's ``True`` / ``False`` into booleans, and the text would reach torch as a string
    (``--amp true``: "argument 'enabled' must be bool, not str") or count as true in a condition."""
    textual = [k for k, v in values.items()
               if isinstance(v, str) and v.lower() in ("true", "false") and isinstance(config_value(config, k), bool)]
    if textual:
        given = ", ".join(f"--{k} {values[k]}" for k in textual)
        fixed = " ".join(f"--{k} {values[k].capitalize()}" for k in textual)
        raise InputError(f"{given}: the monai.bundle command line passes this as text, not a boolean; write "
                         f"{fixed} (True and False capitalised, as in Python).")


def check_override_ids() -> None:
    """Stop when an id given to ``monai.bundle run`` (on the command line, in an ``args_file`` or as a keyword
    of ``monai.bundle.run``) is defined by none of the config files run, nor by the ``--tracking`` settings:
    MONAI would add it silently (``--max_iteration 10`` would train the default 20000 iterations).

    Meant as the first line of a run list (``$scripts.validation.check_override_ids()``). A config expression
    cannot see the parser, so the arguments are read from the ``monai.bundle.run`` call on the stack, or from
    ``sys.argv`` of a ``python -m monai.bundle run`` command line; when neither is found (a ``ConfigWorkflow``
    built directly) nothing is checked. A boolean id given as the text "true" / "false" stops here too
    (``check_boolean_overrides``).
    """
    try:
        call = run_call_from_stack() or run_call_from_argv(sys.argv)
        if call is None or call.config_file is None:
            logger.debug("override check skipped: no `monai.bundle run` call found")
            return
        known = config_ids(call.config_file) | tracking_ids(call.tracking) | {"_meta_"}
        config = call.config_file if isinstance(call.config_file, Mapping) else _merged_config(call.config_file)
    except Exception as e:  # MONAI itself has read these files; never fail a run on re-reading them
        logger.warning("override check skipped: cannot re-read the run's arguments or config files (%s)", e)
        return
    check_ids(call.overrides, known, _config_paths(call.config_file) if not isinstance(call.config_file, Mapping)
              else ())
    check_boolean_overrides(call.values, config)
