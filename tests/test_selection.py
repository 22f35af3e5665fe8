"""Model selection without target labels: the criteria on constructed cases, training on a datalist with no target
label at all, the saved model being the one the criterion ranks best, and the datalists that are refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
from monai.bundle import run

from scripts.data import split_labelled, validation_split
from scripts.reporting import read_history
from scripts.selection import SelectionError, agreement, confidence, information_maximisation, resolve_selection
from scripts.setups import config_files
from tests.conftest import TINY


def one_hot(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(label_map, num_classes).movedim(-1, 0).float()


def test_confidence_is_one_for_one_hot_and_zero_for_uniform_predictions() -> None:
    assert confidence(one_hot(torch.randint(0, 3, (6, 6, 2)), 3)) == pytest.approx(1.0)
    assert confidence(torch.full((4, 5, 5), 0.25)) == pytest.approx(0.0, abs=1e-6)


def test_information_maximisation_rewards_confident_and_varied_predictions() -> None:
    half_and_half = one_hot(torch.tensor([[0, 0, 1, 1]] * 4), 2)
    assert information_maximisation(half_and_half) == pytest.approx(1.0)
    assert information_maximisation(one_hot(torch.zeros(4, 4, dtype=torch.long), 2)) == pytest.approx(0.0, abs=1e-6)
    assert information_maximisation(torch.full((2, 4, 4), 0.5)) == pytest.approx(0.0, abs=1e-6)


def test_agreement_of_identical_disjoint_and_empty_label_maps() -> None:
    a = torch.tensor([[0, 1, 1], [2, 2, 0]])
    assert agreement(a, a.clone(), 3) == 1.0
    assert agreement(a, torch.where(a == 1, 2, torch.where(a == 2, 1, 0)), 3) == 0.0
    assert agreement(a, torch.where(a == 2, 0, a), 3) == pytest.approx(0.5)  # class 1 agrees, class 2 does not
    assert math.isnan(agreement(torch.zeros(2, 2), torch.zeros(2, 2), 3))


def test_auto_selection_follows_the_labels_and_target_labels_needs_them() -> None:
    assert resolve_selection("auto", labelled=True) == "target_labels"
    assert resolve_selection("auto", labelled=False) == "confidence"
    assert resolve_selection("last", labelled=True) == "last"
    with pytest.raises(SelectionError, match="target_labels needs labelled target_val"):
        resolve_selection("target_labels", labelled=False)
    with pytest.raises(SelectionError, match="selection must be one of"):
        resolve_selection("best", labelled=True)


def write_datalist(tiny_dataset, name: str, **splits) -> str:
    datalist = json.loads(tiny_dataset.read_text(encoding="utf-8"))
    content = {"source_train": datalist["source_train"], "target_train": datalist["target_train"], **splits}
    path = tiny_dataset.parent / name
    path.write_text(json.dumps(content), encoding="utf-8")
    return str(path)


def train(bundle_root, tiny_dataset, tmp_path, datalist: str, iterations: int = 2, config_file: list[str] | None = None,
          **overrides) -> None:
    config_file = config_file or [str(bundle_root / "configs/train.yaml"), str(bundle_root / "configs/demo.yaml")]
    run("training", config_file=config_file, logging_file=False, dataset_dir=str(tiny_dataset.parent),
        datalist=datalist, output_dir=str(tmp_path), prepare_dataset="$lambda: None", max_iterations=iterations,
        val_interval=1, **{**TINY, **overrides})


def test_a_datalist_without_any_target_label_trains_and_selects_label_free(bundle_root, tiny_dataset, tmp_path,
                                                                            caplog) -> None:
    datalist = write_datalist(tiny_dataset, "no_target_labels.json")
    assert validation_split(datalist) == "target_train" and not split_labelled(datalist, "target_train")
    with caplog.at_level("INFO", logger="dsan"):
        train(bundle_root, tiny_dataset, tmp_path, datalist)
    assert "model selection: confidence (val_confidence; no target labels used)" in caplog.text
    assert (tmp_path / "model.pt").is_file()
    history = read_history(tmp_path / "validation.json")
    assert [h["mean_dice"] for h in history] == [None, None]
    assert set(history[0]["criteria"]) == {"confidence", "info_max", "symmetry"}


def test_the_saved_model_is_the_validation_the_criterion_ranks_best(bundle_root, tiny_dataset, tmp_path) -> None:
    val = json.loads(tiny_dataset.read_text(encoding="utf-8"))["target_val"]
    datalist = write_datalist(tiny_dataset, "unlabelled_val.json", target_val=[{"image": e["image"]} for e in val])
    train(bundle_root, tiny_dataset, tmp_path, datalist, iterations=4, selection="confidence",
          **{"train#checkpoint_saver#n_saved": 1000})
    scores = [h["criteria"]["confidence"] for h in read_history(tmp_path / "validation.json")]
    assert len(set(scores)) == 4  # the ranking is not a tie
    best_epoch = 1 + scores.index(max(scores))
    kept = torch.load(tmp_path / "model.pt", weights_only=True)
    at_best = torch.load(tmp_path / f"checkpoint_epoch={best_epoch}.pt", weights_only=True)["segmenter"]
    for name, tensor in at_best.items():
        assert torch.equal(kept[name], tensor), name


def test_a_target_val_labelled_for_some_volumes_only_is_refused(bundle_root, tiny_dataset, tmp_path) -> None:
    val = json.loads(tiny_dataset.read_text(encoding="utf-8"))["target_val"]
    datalist = write_datalist(tiny_dataset, "mixed.json", target_val=[val[0], {"image": val[1]["image"]}])
    with pytest.raises(SystemExit, match=r"^ERROR: target_val in .* has labels for 1 of 2 volumes"):
        train(bundle_root, tiny_dataset, tmp_path, datalist)


def test_selection_study_scores_every_checkpoint_and_reports_regret(bundle_root, tiny_dataset, tmp_path) -> None:
    from scripts.selection_study import selection_study

    run_dir = tmp_path / "run"
    train(bundle_root, tiny_dataset, run_dir, str(tiny_dataset), iterations=3, config_file=config_files("demo", "full"),
          **{"train#checkpoint_saver#n_saved": 1000})  # the profile selection_study rebuilds the run's networks with
    overrides = {"dataset_dir": str(tiny_dataset.parent), **TINY}
    table = selection_study(run_dir, output_dir=tmp_path / "study", **overrides)
    records = json.loads((tmp_path / "study" / "checkpoints.json").read_text(encoding="utf-8"))["/".join(
        run_dir.parts[-2:])]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    summary = json.loads((tmp_path / "study" / "summary.json").read_text(encoding="utf-8"))
    assert summary["target_labels"]["regret"] == [0.0]  # the reference picks itself
    best_val = max(records, key=lambda r: r["target_labels"])
    assert summary["last"]["regret"] == [pytest.approx(100 * (best_val["test_dice"] - records[-1]["test_dice"]))]
    assert set(summary) == {"target_labels", "last", "confidence", "info_max", "symmetry"}
    assert table.count("\n") == 6 and (tmp_path / "study" / "criteria.png").stat().st_size > 0
