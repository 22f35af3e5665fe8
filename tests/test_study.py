"""The paper's study as configs and one command; the same seed gives the same losses."""

from __future__ import annotations

import json
import math

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.utils import set_determinism

from scripts.evaluation import summarise
from scripts.metrics import METRIC_NAMES
from scripts.networks import Segmenter
from scripts.setups import CONTINUED, SETUPS, config_files
from scripts.study import (
    check_overrides,
    continued_history,
    gap_closure,
    study,
    study_row,
    study_table,
    with_trained_setups,
)
from scripts.translation_check import translation_check
from tests.conftest import TINY


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_every_setup_is_a_small_override_that_instantiates(bundle_root, tiny_dataset, tmp_path, setup) -> None:
    override = SETUPS[setup][0]
    if override is not None:  # a few lines, never a copy; a stage of its own (self-training) a few more
        assert len((bundle_root / override).read_text(encoding="utf-8").splitlines()) <= (
            25 if setup in CONTINUED else 12)
    parser = ConfigParser()
    parser.read_config(config_files("demo", setup))
    parser.update({"bundle_root": str(bundle_root), "dataset_dir": str(tiny_dataset.parent),
                   "output_dir": str(tmp_path), "device": "$torch.device('cpu')", **TINY})
    if setup in CONTINUED:  # it starts from a trained model
        torch.save(Segmenter(1, 5, width=TINY["encoder_width"]).state_dict(), tmp_path / "init.pt")
        parser["init_ckpt"] = str(tmp_path / "init.pt")
    if setup == "pretrained_encoder":
        pytest.skip("needs a local ResNet-50 weight file; loading is tested in test_networks.py")
    trainer = parser.get_parsed_content("train#trainer")
    terms = {"source_only": {"seg_s"}, "supervised": {"seg_s"}, "adabn": {"seg_s"},
             "self_training": {"seg_s", "seg_s2t", "seg_t"},
             "ablation_gen_t": {"gen_t", "seg_s2t"},
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
    table = study(setups=["source_only", "full", "adabn", "supervised"], profile="demo", max_iterations=2,
                  val_interval=1, max_minutes=60, budget_marks=[0], jobs=2, output_dir=tmp_path / "study",
                  dataset_dir=str(tiny_dataset.parent), prepare_dataset="$lambda: None", **TINY)
    lines = table.splitlines()
    assert lines[0].startswith("| setup | budget | Dice AA |") and len(lines) == 2 + 4 * 2
    assert "L_seg^s only" in lines[2] and "full DSAN" in lines[4] and "AdaBN" in lines[6] and "supervised" in lines[8]
    rows = json.loads((tmp_path / "study" / "results.json").read_text(encoding="utf-8"))
    assert [(r["setup"], r["budget"]) for r in rows] == [
        (name, budget) for name in ("source_only", "full", "adabn", "supervised") for budget in ("0 min", "60 min")]
    for r in rows:
        # the 0-minute mark is the first validation (iteration 1); the whole run ends at max_iterations
        assert r["iterations"] == (1 if r["budget"] == "0 min" else 2)
        assert 0.0 <= r["dice"]["average"] <= 100.0
        assert r["asd_voxel_missed"].keys() == r["asd_voxel"].keys() and all(
            isinstance(k, int) for k in r["asd_voxel_missed"].values())  # evaluate's miss counts are kept
    dice = {r["setup"]: r["dice"]["average"] for r in rows if r["budget"] == "60 min"}
    if dice["supervised"] != dice["source_only"]:
        closed = 100 * (dice["full"] - dice["source_only"]) / (dice["supervised"] - dice["source_only"])
        assert rows[3]["gap_closed"] == pytest.approx(closed)
    assert_adabn_reestimates_the_source_only_models(tmp_path / "study", rows)
    histories = {name: json.loads((tmp_path / "study" / name / "validation.json").read_text(encoding="utf-8"))
                 for name in ("source_only", "full")}
    assert "translation_w1" in histories["full"][-1] and "translation_w1" not in histories["source_only"][-1]
    assert all(h["elapsed_s"] >= 0 for history in histories.values() for h in history)
    for name in ("source_only", "full", "supervised"):  # side by side: each setup logged to its own file
        log = (tmp_path / "study" / name / "train.log").read_text(encoding="utf-8")
        assert "budget mark 0 min" in log
    assert (tmp_path / "study" / "validation_dice.png").stat().st_size > 10_000
    assert (tmp_path / "study" / "table.md").read_text(encoding="utf-8").strip() == table
    # a setup already trained and evaluated in this folder is reused, not trained again
    again = study(setups=["adabn", "supervised"], profile="demo", max_iterations=2, val_interval=1,
                  max_minutes=60, budget_marks=[0], output_dir=tmp_path / "study", dataset_dir=str(tiny_dataset.parent),
                  prepare_dataset="$lambda: None", **TINY)
    assert again.splitlines()[2:] == [lines[i] for i in (2, 3, 6, 7, 8, 9)]  # adabn brings its source-only rows
    assert log == (tmp_path / "study" / "supervised" / "train.log").read_text(encoding="utf-8")


def assert_adabn_reestimates_the_source_only_models(study_dir, rows) -> None:
    by_setup = {(r["setup"], r["budget"]): r for r in rows}
    for budget, model in (("0 min", "model_0min"), ("60 min", "model")):
        source_only, adabn = by_setup[("source_only", budget)], by_setup[("adabn", budget)]
        assert adabn["iterations"] == source_only["iterations"] and adabn["wall_s"] > source_only["wall_s"]
        trained = torch.load(study_dir / "source_only" / f"{model}.pt", weights_only=True)
        recalibrated = torch.load(study_dir / "adabn" / f"{model}.pt", weights_only=True)
        assert not torch.equal(trained["encoder.bn1.running_mean"], recalibrated["encoder.bn1.running_mean"])
        assert torch.equal(trained["encoder.conv1.weight"], recalibrated["encoder.conv1.weight"])
        settings = json.loads((study_dir / "adabn" / f"{model}.json").read_text(encoding="utf-8"))
        assert settings == {**json.loads((study_dir / "source_only" / f"{model}.json").read_text(encoding="utf-8")),
                            "batch_norm_statistics_of": "target_train"}
    assert not (study_dir / "adabn" / "validation.json").exists()  # it trains nothing


def test_self_training_goes_on_from_the_dsan_model_of_the_budget_less_its_stage(tiny_dataset, tmp_path) -> None:
    # a stage of all but 0.06 s of the budget: the DSAN run's first validation is past its mark
    table = study(setups=["self_training"], profile="demo", max_iterations=2, val_interval=1, max_minutes=60,
                  self_training_minutes=59.999, self_training_rounds=2, output_dir=tmp_path / "study",
                  dataset_dir=str(tiny_dataset.parent), prepare_dataset="$lambda: None", **TINY)
    rows = json.loads((tmp_path / "study" / "results.json").read_text(encoding="utf-8"))
    assert [(r["setup"], r["budget"]) for r in rows] == [("full", "0.001 min"), ("full", "60 min"),
                                                         ("self_training", "60 min")]
    assert "self-training" in table.splitlines()[-1]
    stage = tmp_path / "study" / "self_training"
    mark = json.loads((tmp_path / "study" / "full" / "budget_marks.json").read_text(encoding="utf-8"))["0.001"]
    labelled_by = [json.loads((stage / f"round_{r}" / "pseudo_labels" / "pseudo_labels.json")
                              .read_text(encoding="utf-8"))["model"] for r in (1, 2)]
    # round 1 labels with DSAN's model at the mark, round 2 with round 1's best model
    assert labelled_by == [str((tmp_path / "study" / "full" / mark["model"]).resolve()),
                           str(stage / "round_1" / "model.pt")]
    assert rows[2]["iterations"] == mark["iteration"] + 2 + 2  # both stages' iterations, both rounds
    assert rows[2]["wall_s"] > mark["elapsed_s"] and 0.0 <= rows[2]["dice"]["average"] <= 100.0
    curve = continued_history(stage, tmp_path / "study" / "full", 60, 59.999)
    assert [h["iteration"] for h in curve] == [mark["iteration"] + i for i in (1, 2, 3, 4)]
    with pytest.raises(SystemExit, match="longer than --self_training_minutes"):
        study(setups=["self_training"], profile="demo", max_minutes=10, self_training_minutes=10,
              output_dir=tmp_path / "refused")


def test_a_recalibrated_setup_brings_the_setup_it_reads() -> None:
    assert with_trained_setups(["full", "adabn"]) == ["full", "source_only", "adabn"]
    assert with_trained_setups(["adabn", "source_only"]) == ["adabn", "source_only"]  # already there: after it
    assert with_trained_setups(["source_only", "adabn"]) == ["source_only", "adabn"]


def test_gap_closure_is_the_share_of_the_source_only_to_supervised_gap() -> None:
    def row(setup: str, dice: float | None, budget: str = "10 min") -> dict:
        return {"setup": setup, "budget": budget, "dice": {"average": dice}}

    rows = [row("source_only", 20.0), row("supervised", 80.0), row("full", 56.0), row("full", 50.0, "30 min"),
            row("running_stats_all", None)]
    gap_closure(rows)
    assert [r["gap_closed"] for r in rows] == [0.0, 100.0, pytest.approx(60.0), None, None]


def evaluated_summary(asd_of_b: dict[str, float]) -> dict:
    """evaluate's summary of volumes whose class A has ASD 1 and class B the given ASD (inf: B missed)."""
    rows = [{"volume": v, "class": c, "class_name": "AB"[c - 1], **dict.fromkeys(METRIC_NAMES, value),
             "dice": 0.0 if math.isinf(value) else 100.0, "pred_empty": math.isinf(value), "label_empty": False}
            for v, b in asd_of_b.items() for c, value in ((1, 1.0), (2, b))]
    return summarise(rows, ["A", "B"])


def test_asd_cells_and_results_keep_the_misses() -> None:
    missed = study_row("full", "10 min", 5, 60.0, evaluated_summary({"v1": 3.0, "v2": 2.0, "v3": math.inf}),
                       ["A", "B"])
    assert missed["asd_voxel"] == {"A": 1.0, "B": 2.5, "average": 1.75}  # v3 is a miss of B and of the average
    assert missed["asd_voxel_missed"] == {"A": 0, "B": 1, "average": 1}
    all_found = study_row("source_only", "10 min", 5, 60.0, evaluated_summary({"v1": 3.0, "v2": 2.0}), ["A", "B"])
    assert all_found["asd_voxel_missed"] == {"A": 0, "B": 0, "average": 0}
    lines = study_table([missed, all_found], ["A", "B"]).splitlines()
    asd_cells = [line.split(" | ")[5:8] for line in lines[2:]]  # ASD A, ASD B, ASD avg
    assert asd_cells == [["1.00", "2.50 (1 miss)", "1.75 (1 miss)"], ["1.00", "2.50", "1.75"]]


def losses_of_a_run(bundle_root, dataset_dir, out, iterations: int) -> list[dict[str, float]]:
    workflow = ConfigWorkflow(
        config_file=[str(bundle_root / "configs/train.yaml"), str(bundle_root / "configs/demo.yaml")],
        workflow_type="train", run_id="training", logging_file=False, bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir), output_dir=str(out), prepare_dataset="$lambda: None",
        max_iterations=iterations, val_interval=iterations, **TINY)
    workflow.initialize()
    history = []
    set_determinism(seed=0)  # the networks are built here, before the run list's own set_determinism
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


def test_translation_check_reports_per_class_intensities_of_a_trained_run(tiny_dataset, tmp_path) -> None:
    study(setups=["full"], profile="demo", max_iterations=2, val_interval=1, output_dir=tmp_path / "study",
          dataset_dir=str(tiny_dataset.parent), prepare_dataset="$lambda: None", **TINY)
    table = translation_check(tmp_path / "study" / "full", profile="demo", setup="full",
                              dataset_dir=str(tiny_dataset.parent), **TINY)
    rows = {line.split(" | ")[0].strip("| "): [float(v) for v in line.strip("| ").split(" | ")[1:]]
            for line in table.splitlines()[4:]}
    assert list(rows) == ["background", "AA", "LAC", "LVC", "MYO"]
    assert "checkpoint_epoch=2.pt" in table.splitlines()[0]
    for x_s, x_t, x_s2t, x_t2t, gap_translated, gap_untranslated in rows.values():
        assert all(-1.0 <= v <= 1.0 for v in (x_s, x_t, x_s2t, x_t2t))  # images in [-1, 1], U_t ends in tanh
        assert gap_translated == pytest.approx(abs(x_s2t - x_t), abs=2e-3)
        assert gap_untranslated == pytest.approx(abs(x_s - x_t), abs=2e-3)
    assert rows["MYO"][0] < 0 < rows["MYO"][1]  # the phantom's myocardium: dark in the source, bright in the target


def test_cpu_profile_trains_your_own_data_with_your_class_names(tiny_dataset, tmp_path) -> None:
    files_before = sorted(p.name for p in tiny_dataset.parent.rglob("*"))
    table = study(setups=["full"], profile="cpu", max_iterations=2, val_interval=1, output_dir=tmp_path / "study",
                  dataset_dir=str(tiny_dataset.parent), class_names=["A", "B", "C", "D"], **TINY)
    assert sorted(p.name for p in tiny_dataset.parent.rglob("*")) == files_before  # no phantom generated into it
    header, _, row = table.splitlines()
    assert "| Dice A | Dice B | Dice C | Dice D |" in header
    assert "n/a" not in row.split(" | ")[2]  # the overridden class names are the ones the scores are read with
    results = json.loads((tmp_path / "study" / "results.json").read_text(encoding="utf-8"))
    assert set(results[0]["dice"]) == {"A", "B", "C", "D", "average"}


@pytest.mark.parametrize("profile, what", [("demo", "its phantom"), ("demo_brain", "the brain benchmark")])
def test_the_generated_data_profiles_refuse_your_own_dataset_dir(tmp_path, profile, what) -> None:
    with pytest.raises(SystemExit, match=f"^ERROR: profile {profile} generates {what} .* --profile cpu$"):
        study(profile=profile, dataset_dir=str(tmp_path))


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_setup_is_reported_and_the_others_finish(tiny_dataset, tmp_path, capsys, jobs) -> None:
    # the full method's L_adv^sec weight is NaN: its training stops at the first iteration, source-only is unaffected
    poisoned = {"lambda_secadv": "$float('nan') if 'adv_sec' in @terms else 0.1"}
    with pytest.raises(SystemExit) as stopped:
        study(setups=["source_only", "full"], profile="cpu", max_iterations=2, val_interval=1, jobs=jobs,
              output_dir=tmp_path / "study", dataset_dir=str(tiny_dataset.parent), **poisoned, **TINY)
    log = tmp_path / "study" / "full" / "train.log"
    assert str(stopped.value.code) == f"ERROR: study setup full failed (log: {log}): non-finite loss: " + (
        str(stopped.value.code).split("non-finite loss: ", 1)[1])
    assert "\n" not in str(stopped.value.code) and "Traceback" in log.read_text(encoding="utf-8")
    rows = json.loads((tmp_path / "study" / "results.json").read_text(encoding="utf-8"))
    assert [(r["setup"], r["budget"]) for r in rows] == [("source_only", "whole run"), ("full", "FAILED")]
    assert rows[0]["dice"]["average"] is not None and "failed" not in rows[0]
    table = (tmp_path / "study" / "table.md").read_text(encoding="utf-8")
    assert "| + L_adv^sec (full DSAN) | FAILED |" in table
    assert "study: full done" not in capsys.readouterr().out


@pytest.mark.parametrize("option", ["help", "max_minute"])
def test_an_unknown_option_stops_before_any_training(tmp_path, option) -> None:
    with pytest.raises(SystemExit, match=rf"\['{option}'\] are neither options of study nor config ids"):
        study(setups="full", output_dir=str(tmp_path / "study"), **{option: True})
    assert not (tmp_path / "study").exists()


def test_an_id_of_a_setups_own_file_is_an_option_of_that_setup_only() -> None:
    check_overrides("demo", ["full", "self_training"], {"pseudo_label_share": 0.2, "seed": 1})
    with pytest.raises(SystemExit, match=r"\['pseudo_label_share'\] are neither"):
        check_overrides("demo", ["full", "source_only"], {"pseudo_label_share": 0.2})
