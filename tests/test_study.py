"""The paper's study as configs and one command; the same seed gives the same losses."""

from __future__ import annotations

import json

import pytest
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.study import SETUPS, config_files, study
from tests.conftest import TINY


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_every_setup_is_a_small_override_that_instantiates(bundle_root, tiny_dataset, tmp_path, setup) -> None:
    override = SETUPS[setup][0]
    if override is not None:
        assert len((bundle_root / override).read_text(encoding="utf-8").splitlines()) <= 12  # a few lines, never a copy
    parser = ConfigParser()
    parser.read_config(config_files("demo", setup))
    parser.update({"bundle_root": str(bundle_root), "dataset_dir": str(tiny_dataset.parent),
                   "output_dir": str(tmp_path), "device": "$torch.device('cpu')", **TINY})
    if setup == "pretrained_encoder":
        pytest.skip("needs a local ResNet-50 weight file; loading is tested in test_networks.py")
    trainer = parser.get_parsed_content("train#trainer")
    terms = {"source_only": {"seg_s"}, "supervised": {"seg_s"}, "ablation_gen_t": {"gen_t", "seg_s2t"},
             "ablation_gen_ts": {"gen_t", "seg_s2t", "gen_s"},
             "ablation_gen_ts_seg": {"gen_t", "seg_s2t", "gen_s", "seg_s"}}
    assert trainer.terms == terms.get(setup, {"gen_t", "gen_s", "seg_s", "seg_s2t", "adv_sec"})
    assert (trainer.decoder_s is trainer.decoder_t) == (setup == "variant_shared_decoders")
    assert (trainer.translation_encoder is not trainer.segmenter.encoder) == (setup == "variant_unshared_encoders")
    shared_dp = all(a is b for a, b in zip(trainer.prediction_discriminators,
                                           trainer.translated_prediction_discriminators))
    assert shared_dp == (setup != "variant_unshared_discriminators")
    if setup == "supervised":  # trained on the target's labelled training volumes
        data = parser.get_parsed_content("train#dataset#data")
        assert all("target_train" in entry["label"] for entry in data)


def test_study_command_writes_the_table_and_the_curves(tiny_dataset, tmp_path) -> None:
    table = study(setups=["source_only", "full"], profile="demo", max_iterations=2, val_interval=1,
                  output_dir=tmp_path / "study", dataset_dir=str(tiny_dataset.parent), prepare_dataset="$lambda: None",
                  **TINY)
    lines = table.splitlines()
    assert lines[0].startswith("| setup | Dice AA |") and len(lines) == 4
    assert "L_seg^s only" in lines[2] and "full DSAN" in lines[3]
    results = json.loads((tmp_path / "study" / "results.json").read_text(encoding="utf-8"))
    for name in ("source_only", "full"):
        assert results[name]["iterations"] == 2
        assert 0.0 <= results[name]["dice"]["average"] <= 100.0
    assert (tmp_path / "study" / "validation_dice.png").stat().st_size > 10_000
    assert (tmp_path / "study" / "table.md").read_text(encoding="utf-8").strip() == table


def losses_of_a_run(bundle_root, dataset_dir, out, iterations: int) -> list[dict[str, float]]:
    workflow = ConfigWorkflow(
        config_file=[str(bundle_root / "configs/train.yaml"), str(bundle_root / "configs/demo.yaml")],
        workflow_type="train", run_id="training", logging_file=False, bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir), output_dir=str(out), prepare_dataset="$lambda: None",
        max_iterations=iterations, val_interval=iterations, **TINY)
    workflow.initialize()
    history = []
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda engine: history.append({k: float(v) for k, v in engine.state.output.items()}))
    workflow.run()
    return history


def test_same_seed_gives_the_same_losses_on_cpu(bundle_root, tiny_dataset, tmp_path) -> None:
    first = losses_of_a_run(bundle_root, tiny_dataset.parent, tmp_path / "a", iterations=20)
    second = losses_of_a_run(bundle_root, tiny_dataset.parent, tmp_path / "b", iterations=20)
    assert len(first) == len(second) == 20
    for it, (a, b) in enumerate(zip(first, second), 1):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name] == pytest.approx(b[name], abs=1e-6), f"iteration {it}, {name}"
    assert first[0]["loss"] != first[-1]["loss"]  # it trained
