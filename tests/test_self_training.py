"""Self-training after DSAN: class-balanced pseudo-labels, a loss that ignores the unlabelled pixels, the
self_training workflow, and its resume after a kill."""

from __future__ import annotations

import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run

from scripts.losses import IGNORE_LABEL, SegmentationLoss
from scripts.networks import Segmenter
from scripts.pseudo_labels import (
    class_balanced_thresholds,
    confident_labels,
    pseudo_label_quality,
    pseudo_label_split,
    share_sweep,
)
from scripts.self_training import train_in_rounds
from scripts.validation import InputError
from tests.conftest import TINY
from tests.test_resilience import assert_same_final_state, run_uninterrupted_and_killed

CONFIGS = "['configs/train.yaml','configs/demo.yaml','configs/self_training.yaml']"


def test_class_balanced_thresholds_keep_the_most_confident_share_of_each_class() -> None:
    # class 0: ten pixels, class 1: four, class 2: none; confidences distinct within each class
    predicted = torch.tensor([0] * 10 + [1] * 4)
    confidence = torch.tensor([0.50, 0.91, 0.62, 0.99, 0.55, 0.73, 0.88, 0.51, 0.95, 0.60,
                               0.40, 0.97, 0.45, 0.70])
    thresholds = class_balanced_thresholds(confidence, predicted, num_classes=3, share=0.5)
    assert thresholds[0] == pytest.approx(0.73) and thresholds[1] == pytest.approx(0.70)
    assert thresholds[2] == float("inf")  # a class nothing is predicted as
    kept = confident_labels(confidence, predicted, thresholds)
    expected = torch.full_like(predicted, IGNORE_LABEL)
    expected[[1, 3, 5, 6, 8]] = 0  # the five most confident of class 0
    expected[[11, 13]] = 1  # ceil(0.5 * 4) = 2 of class 1
    assert torch.equal(kept, expected)
    # a share that is not a whole number of pixels rounds up; the whole share keeps every pixel
    assert (confident_labels(confidence, predicted, class_balanced_thresholds(confidence, predicted, 3, 0.3))
            == 1).sum() == 2
    everything = confident_labels(confidence, predicted, class_balanced_thresholds(confidence, predicted, 3, 1.0))
    assert torch.equal(everything, predicted)
    with pytest.raises(ValueError, match="share"):
        class_balanced_thresholds(confidence, predicted, 3, 0.0)


def test_an_empty_class_keeps_nothing_and_its_quality_has_no_ratio() -> None:
    predicted = torch.zeros(4, 5, 5, dtype=torch.long)  # every pixel predicted background
    confidence = torch.rand(4, 5, 5)
    kept = confident_labels(confidence, predicted, class_balanced_thresholds(confidence, predicted, 3, 0.5))
    assert set(kept.unique().tolist()) == {0, IGNORE_LABEL}
    truth = torch.zeros_like(predicted)
    truth[0, :2] = 1
    quality = pseudo_label_quality(kept, truth, ["A", "B"])
    assert quality["A"] == {"kept": 0, "precision": None, "share_of_class": 0.0}
    assert quality["B"] == {"kept": 0, "precision": None, "share_of_class": None}  # absent from the truth too


def test_pseudo_label_quality_is_precision_and_share_of_the_true_class() -> None:
    truth = torch.tensor([1, 1, 1, 1, 2, 2, 0, 0])
    pseudo = torch.tensor([1, 1, IGNORE_LABEL, 2, 2, IGNORE_LABEL, 1, IGNORE_LABEL])
    quality = pseudo_label_quality(pseudo, truth, ["A", "B"])
    assert quality["A"] == {"kept": 3, "precision": pytest.approx(2 / 3), "share_of_class": pytest.approx(2 / 4)}
    assert quality["B"] == {"kept": 2, "precision": pytest.approx(1 / 2), "share_of_class": pytest.approx(1 / 2)}


@pytest.mark.parametrize("class_weights", ["inverse_frequency", None])
def test_ignored_pixels_contribute_no_gradient(class_weights) -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 8, 8))
    ignored = torch.rand(2, 8, 8) < 0.4
    labels[ignored] = IGNORE_LABEL
    loss_fn = SegmentationLoss(3, class_weights=class_weights)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)  # at label size: each pixel has its own logits
    loss = loss_fn([logits], labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad[ignored.unsqueeze(1).expand_as(logits)].abs().max() == 0
    assert logits.grad[~ignored.unsqueeze(1).expand_as(logits)].abs().max() > 0
    # whatever the network says at the ignored pixels, the loss is the same
    changed = logits.detach().clone()
    changed[ignored.unsqueeze(1).expand_as(changed)] = 10 * torch.randn(int(ignored.sum()) * 3)
    assert float(loss_fn([changed], labels)) == pytest.approx(float(loss), rel=1e-6)


def test_a_batch_with_every_pixel_ignored_gives_a_zero_loss_and_zero_gradients() -> None:
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = SegmentationLoss(3)([logits, logits * 2], torch.full((2, 8, 8), IGNORE_LABEL))
    loss.backward()
    assert float(loss) == 0.0 and logits.grad.abs().max() == 0


def tiny_overrides(tiny_dataset, out, init, auxiliary=None) -> dict:
    return {"dataset_dir": str(tiny_dataset.parent), "output_dir": str(out), "init_ckpt": str(init),
            "init_auxiliary_ckpt": None if auxiliary is None else str(auxiliary),
            "prepare_dataset": "$lambda: None", "max_iterations": 4, "val_interval": 2, "pseudo_label_share": 0.5,
            **TINY}


@pytest.fixture(scope="module")
def init_model(tmp_path_factory):
    """An untrained tiny segmenter as the model self-training starts from (no sidecar: nothing to contradict)."""
    path = tmp_path_factory.mktemp("init") / "model.pt"
    torch.manual_seed(0)
    torch.save(Segmenter(1, 5, width=TINY["encoder_width"]).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def init_auxiliary(bundle_root, tiny_dataset, init_model):
    """U_s, U_t and the discriminators of a tiny DSAN run (as a budget mark keeps them), each weight moved off a
    fresh build's so that loading them shows."""
    parser = ConfigParser()
    parser.read_config(eval(CONFIGS))
    parser.update({**tiny_overrides(tiny_dataset, init_model.parent / "unused", init_model),
                   "bundle_root": str(bundle_root)})
    torch.manual_seed(1)
    state = {name: {key: value + 0.5 for key, value in module.state_dict().items()}
             for name, module in parser.get_parsed_content("train#trainer").auxiliary_networks.items()}
    path = init_model.with_name("auxiliary_20min.pt")
    torch.save(state, path)
    return path


def test_self_training_pseudo_labels_the_target_and_trains_on_it(bundle_root, tiny_dataset, tmp_path,
                                                                 init_model, init_auxiliary) -> None:
    out = tmp_path / "st"
    run("self_training", config_file=eval(CONFIGS), bundle_root=str(bundle_root), logging_file=False,
        **tiny_overrides(tiny_dataset, out, init_model, init_auxiliary))
    manifest = json.loads((out / "pseudo_labels" / "pseudo_labels.json").read_text(encoding="utf-8"))
    assert manifest["model"] == str(init_model.resolve()) and manifest["share"] == 0.5
    assert len(manifest["entries"]) == 3  # every target_train volume
    for entry in manifest["entries"]:
        pseudo = nib.load(entry["label"])
        image = nib.load(entry["image"])
        assert pseudo.shape == image.shape  # RAS phantom: the preprocessed grid is the image's own
        np.testing.assert_allclose(pseudo.affine, image.affine, atol=1e-5)
        values = set(np.unique(np.asarray(pseudo.dataobj)).tolist())
        assert IGNORE_LABEL in values and values - {IGNORE_LABEL} <= set(range(5))
    for name in ("AA", "LAC", "LVC", "MYO"):  # the phantom has target labels: the kept pixels are scored
        q = manifest["quality"][name]
        assert q["kept"] == manifest["kept_pixels"][name]
        assert q["precision"] is None or 0.0 <= q["precision"] <= 1.0
    assert (out / "model.pt").is_file() and (out / "model.json").is_file()
    history = json.loads((out / "validation.json").read_text(encoding="utf-8"))
    assert [h["iteration"] for h in history] == [2, 4]
    assert not (out / "translations").exists()  # no translation trained, none previewed
    # rerun into the same folder: the pseudo-labels are reused, not made again from another model
    with pytest.raises(SystemExit, match="holds pseudo-labels of model"):
        other = tmp_path / "other.pt"
        torch.save(torch.load(init_model, weights_only=True), other)
        run("self_training", config_file=eval(CONFIGS), bundle_root=str(bundle_root), logging_file=False,
            **{**tiny_overrides(tiny_dataset, out, other, init_auxiliary), "max_iterations": 6})


def test_share_sweep_scores_the_kept_pixels_against_the_target_labels_and_needs_them(tiny_dataset, tmp_path,
                                                                                      init_model) -> None:
    state = torch.load(init_model, weights_only=True)
    state["main_classifier.branches.0.bias"][3] += 5.0  # calls every pixel LVC, some more surely than others
    lvc_everywhere = tmp_path / "lvc.pt"
    torch.save(state, lvc_everywhere)
    table = share_sweep(lvc_everywhere, profile="demo", shares=[1.0, 0.5, 0.2], dataset_dir=str(tiny_dataset.parent),
                        **TINY)
    lines = table.splitlines()
    assert lines[2] == ("| share kept | AA: precision / of class | LAC: precision / of class | "
                        "LVC: precision / of class | MYO: precision / of class |")
    assert [line.split(" | ")[0].strip("| ") for line in lines[4:]] == ["1", "0.5", "0.2"]
    rows = [[cell.split(" / ") for cell in line.strip("| ").split(" | ")[1:]] for line in lines[4:]]
    assert all(row[k] == ["n/a", "0.0"] for row in rows for k in (0, 1, 3))  # nothing kept as AA, LAC, MYO
    truth = np.concatenate([np.asarray(nib.load(tiny_dataset.parent / e["label"]).dataobj).ravel()
                            for e in json.loads(tiny_dataset.read_text(encoding="utf-8"))["target_train_labels"]])
    precision, coverage = zip(*[(float(row[2][0]), float(row[2][1])) for row in rows])
    assert precision[0] == pytest.approx(100 * np.mean(truth == 3), abs=0.05)  # every pixel kept as LVC
    assert coverage[0] == 100.0 and coverage[0] >= coverage[1] >= coverage[2] > 0.0
    kept = [c / p for p, c in zip(precision, coverage)]  # pixels kept as LVC, in units of the true LVC pixels
    assert kept[1] / kept[0] == pytest.approx(0.5, rel=0.15) and kept[2] / kept[0] == pytest.approx(0.2, rel=0.15)
    datalist = json.loads(tiny_dataset.read_text(encoding="utf-8"))
    del datalist["target_train_labels"]
    unlabelled = tmp_path / "unlabelled.json"
    unlabelled.write_text(json.dumps(datalist), encoding="utf-8")
    with pytest.raises(SystemExit, match="target_train_labels"):
        share_sweep(init_model, profile="demo", dataset_dir=str(tiny_dataset.parent), datalist=str(unlabelled), **TINY)


def test_true_labels_of_other_images_or_order_stop_before_anything_is_labelled(tmp_path) -> None:
    entries = [{"image": "a.nii.gz"}, {"image": "b.nii.gz"}]
    swapped = [{"image": "b.nii.gz", "label": "b_label.nii.gz"}, {"image": "a.nii.gz", "label": "a_label.nii.gz"}]
    with pytest.raises(InputError, match="same order"):
        pseudo_label_split(Segmenter(1, 5, width=TINY["encoder_width"]), entries, lambda item: item, share=0.5,
                           num_classes=5, class_names=["AA", "LAC", "LVC", "MYO"], batch_size=2, device="cpu",
                           output_dir=tmp_path / "pl", true_labels=swapped)
    assert not (tmp_path / "pl").exists()


def test_self_training_needs_a_model_to_start_from(bundle_root, tiny_dataset, tmp_path, init_auxiliary) -> None:
    with pytest.raises(InputError, match="init_ckpt is not set"):
        run("self_training", config_file=eval(CONFIGS), bundle_root=str(bundle_root), logging_file=False,
            **{**tiny_overrides(tiny_dataset, tmp_path / "st", "x", init_auxiliary), "init_ckpt": None})


def test_stage_terms_that_translate_need_the_dsan_runs_decoders(bundle_root, tiny_dataset, tmp_path,
                                                                 init_model) -> None:
    with pytest.raises(InputError, match=r"terms \['seg_s2t'\] read the decoders"):  # the default terms
        run("self_training", config_file=eval(CONFIGS), bundle_root=str(bundle_root), logging_file=False,
            **tiny_overrides(tiny_dataset, tmp_path / "st", init_model))
    with pytest.raises(InputError, match="does not exist"):
        run("self_training", config_file=eval(CONFIGS), bundle_root=str(bundle_root), logging_file=False,
            **tiny_overrides(tiny_dataset, tmp_path / "st", init_model, tmp_path / "missing.pt"))
    assert not (tmp_path / "st" / "pseudo_labels").exists()  # stopped before labelling the target
    # the former stage, without Eq. (8), reads no decoder and needs none
    run("self_training", config_file=eval(CONFIGS), bundle_root=str(bundle_root), logging_file=False,
        **{**tiny_overrides(tiny_dataset, tmp_path / "st", init_model), "terms": ["seg_s", "seg_t"]})
    assert (tmp_path / "st" / "model.pt").is_file()


def test_eq_8_in_the_stage_reads_the_given_decoder_and_leaves_it_as_it_was(bundle_root, tiny_dataset, tmp_path,
                                                                          init_model, init_auxiliary) -> None:
    out = tmp_path / "st"
    run("self_training", config_file=eval(CONFIGS), bundle_root=str(bundle_root), logging_file=False,
        **tiny_overrides(tiny_dataset, out, init_model, init_auxiliary))
    final = torch.load(out / "checkpoint_epoch=2.pt", weights_only=True)
    given = torch.load(init_auxiliary, weights_only=True)
    for key, value in given["decoder_t"].items():  # x_s->t is detached before E: Eq. (8) never moves U_t
        assert torch.equal(final["decoder_t"][key], value), key
    assert not torch.equal(final["segmenter"]["main_classifier.branches.0.weight"],
                           torch.load(init_model, weights_only=True)["main_classifier.branches.0.weight"])


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_rounds_relabel_with_the_model_of_the_round_before_and_a_rerun_skips_finished_rounds(
        bundle_root, tiny_dataset, tmp_path, init_model, init_auxiliary) -> None:
    out = tmp_path / "rounds"
    overrides = {**tiny_overrides(tiny_dataset, out, init_model, init_auxiliary), "bundle_root": str(bundle_root),
                 "logging_file": False}
    del overrides["output_dir"], overrides["init_ckpt"]
    records = train_in_rounds(eval(CONFIGS), str(init_model), str(out), rounds=2, **overrides)
    assert [r["init_ckpt"] for r in records] == [str(init_model.resolve()), str(out / "round_1" / "model.pt")]
    for r, record in enumerate(records, start=1):
        manifest = json.loads((out / f"round_{r}" / "pseudo_labels" / "pseudo_labels.json").read_text(encoding="utf-8"))
        assert manifest["model"] == record["init_ckpt"] and record["quality"] == manifest["quality"]
        assert record["iterations"] == 4
    assert json.loads((out / "rounds.json").read_text(encoding="utf-8")) == records
    assert (out / "model.pt").read_bytes() == (out / "round_2" / "model.pt").read_bytes()
    assert (out / "model.json").read_text(encoding="utf-8") == (out / "round_2" / "model.json").read_text(
        encoding="utf-8")
    logged, scored = scalars(out), 0  # per round, per class: the kept pixels and, with target labels, their quality
    for name in ("AA", "LAC", "LVC", "MYO"):
        assert [step for step, _ in logged[f"pseudo_labels/kept/{name}"]] == [1, 2]
        assert [value for _, value in logged[f"pseudo_labels/kept/{name}"]] == [
            record["kept_pixels"][name] for record in records]
        for key in ("precision", "share_of_class"):
            expected = [(r["round"], r["quality"][name][key]) for r in records if r["quality"][name][key] is not None]
            got = logged.get(f"pseudo_labels/{key}/{name}", [])
            assert [step for step, _ in got] == [step for step, _ in expected]
            assert [value for _, value in got] == pytest.approx([value for _, value in expected])
            scored += len(expected)
    assert scored > 0
    finished = (out / "round_2" / "model.pt").stat().st_mtime_ns
    assert train_in_rounds(eval(CONFIGS), str(init_model), str(out), rounds=2, **overrides) == records
    assert (out / "round_2" / "model.pt").stat().st_mtime_ns == finished  # nothing trained again
    with pytest.raises(SystemExit, match="at least 1"):
        train_in_rounds(eval(CONFIGS), str(init_model), str(tmp_path / "none"), rounds=0)


def cli(dataset_dir, out, init, auxiliary) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", "self_training", "--config_file", CONFIGS,
            "--dataset_dir", str(dataset_dir), "--output_dir", str(out), "--init_ckpt", str(init),
            "--init_auxiliary_ckpt", str(auxiliary),
            "--prepare_dataset", "$lambda: None", "--max_iterations", "40", "--val_interval", "10",
            *[item for k, v in TINY.items() for item in (f"--{k}", str(v).replace(" ", ""))]]


def test_kill_9_then_rerun_ends_as_an_uninterrupted_self_training_run(bundle_root, tiny_dataset, tmp_path,
                                                                     init_model, init_auxiliary) -> None:
    uninterrupted, killed, resumed = run_uninterrupted_and_killed(
        lambda out: cli(tiny_dataset.parent, out, init_model, init_auxiliary), tmp_path, bundle_root)
    assert "reusing" in resumed.stdout + resumed.stderr  # the pseudo-labels it started with
    assert_same_final_state(uninterrupted, killed, epoch=4, iterations=40)
