"""The setups of the paper's study and the profiles they run in: which override files, layered on
configs/train.yaml, make each. The study (scripts/study.py) and the diagnostics that rebuild a setup's networks
(recalibration, translation_check, selection_study, benchmark) read them from here."""

from __future__ import annotations

from pathlib import Path

from monai.bundle import ConfigParser

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
# override files of each profile, between train.yaml and the setup's: cpu sizes the networks for a CPU, demo adds
# the phantom, demo_brain the brain benchmark (generated into dataset_dir)
PROFILES = {"demo": ["configs/cpu.yaml", "configs/demo.yaml"],
            "demo_brain": ["configs/cpu.yaml", "configs/demo.yaml", "configs/demo_brain.yaml"],
            "cpu": ["configs/cpu.yaml"], "paper": []}
GENERATED_DATA = {"demo": "its phantom", "demo_brain": "the brain benchmark"}
"""The profiles that generate their own dataset (scripts/phantom.py, scripts/brain.py)."""
# setup name -> (override file on train.yaml or None for the full method, label as in the paper's tables)
SETUPS = {
    "source_only": ("configs/source_only.yaml", "L_seg^s only (no adaptation)"),
    "ablation_gen_t": ("configs/ablation_gen_t.yaml", "L_gen^t + L_seg^s->t"),
    "ablation_gen_ts": ("configs/ablation_gen_ts.yaml", "+ L_gen^s"),
    "ablation_gen_ts_seg": ("configs/ablation_gen_ts_seg.yaml", "+ L_seg^s"),
    "full": (None, "+ L_adv^sec (full DSAN)"),
    "variant_shared_decoders": ("configs/variant_shared_decoders.yaml", "shared decoders"),
    "variant_unshared_encoders": ("configs/variant_unshared_encoders.yaml", "unshared encoders"),
    "variant_unshared_discriminators": ("configs/variant_unshared_discriminators.yaml", "unshared discriminators"),
    "supervised": ("configs/supervised.yaml", "supervised on target (upper bound)"),
    "pretrained_encoder": ("configs/pretrained_encoder.yaml", "full DSAN, ResNet-50-initialised encoder"),
    "running_stats_all": ("configs/running_stats_all.yaml", "full DSAN, running_stats: all (every pass of E)"),
    "adabn": ("configs/source_only.yaml", "source-only, BN statistics re-estimated on target_train (AdaBN)"),
    "self_training": ("configs/self_training.yaml", "full DSAN, then self-training on CBST pseudo-labels"),
}
RECALIBRATED = {"adabn": "source_only"}
"""Setups that train nothing of their own: the named setup's models (one per budget) with their batch-norm
running statistics re-estimated on target_train (AdaBN, Li et al. 2016), the cheap baseline an adapted model
has to beat."""
CONTINUED = {"self_training": "full"}
"""Setups that go on from the named setup's best model at an earlier budget mark (scripts/study.py: the last
``self_training_minutes`` of the budget are self-training, the rest the DSAN run's first minutes)."""
DERIVED = {**RECALIBRATED, **CONTINUED}
"""Setups that start from another setup's models, run once that one is done."""
# the paper's study and the AdaBN baseline: not pretrained_encoder (needs a local weight file), running_stats_all
# (a choice the paper leaves open, compared with train.yaml's) nor self_training (beyond the paper; its budget is
# wall clock, which the default study does not set)
DEFAULT_SETUPS = [name for name in SETUPS if name not in ("pretrained_encoder", "running_stats_all", "self_training")]


def config_files(profile: str, setup: str) -> list[str]:
    override = SETUPS[setup][0]
    return [str(BUNDLE_ROOT / f) for f in ["configs/train.yaml", *PROFILES[profile], *([override] if override else [])]]


def bundle_config(profile: str, setup: str, **overrides: object) -> ConfigParser:
    """The config of one setup (train.yaml, the profile's and the setup's override files) rooted at this bundle,
    with ``overrides`` applied."""
    parser = ConfigParser()
    parser.read_config(config_files(profile, setup))
    parser.update({"bundle_root": str(BUNDLE_ROOT), **overrides})
    return parser
