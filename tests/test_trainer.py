"""One DSAN iteration: what each step updates, what it must leave alone, and the Table IV / V switches."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from scripts import losses
from scripts.data import UnpairedBatches
from scripts.losses import SegmentationLoss
from scripts.networks import DilatedConv2d, PatchDiscriminator, Segmenter, TranslationDecoder, unique_parameters
from scripts.trainer import DSANForward, DSANTrainer, WallClockBudget, epochs_for, planned_passes

SIZE, BATCH, CLASSES = 32, 2, 3


def batches(size: int = SIZE, count: int = 1) -> UnpairedBatches:
    gen = torch.Generator().manual_seed(0)
    source, target = [], []
    for _ in range(count):  # the first item is the same whatever the count
        source.append({"image": torch.rand(BATCH, 1, size, size, generator=gen) * 2 - 1,
                       "label": torch.randint(0, CLASSES, (BATCH, 1, size, size), generator=gen).float()})
        target.append({"image": torch.rand(BATCH, 1, size, size, generator=gen) * 2 - 1})
    return UnpairedBatches(source, target)


def make_trainer(
    shared_decoders: bool = False, unshared_encoders: bool = False, unshared_discriminators: bool = False,
    max_epochs: int = 1, segmentation_loss_factory=SegmentationLoss, size: int = SIZE, fused_adam: bool = False,
    **kwargs,
) -> DSANTrainer:
    torch.manual_seed(0)
    segmenter = Segmenter(1, CLASSES, width=0.125)
    translation_encoder = Segmenter(1, CLASSES, width=0.125).encoder if unshared_encoders else segmenter.encoder
    channels = segmenter.encoder.layer4_channels
    decoder_t = TranslationDecoder(channels, channels=16)
    decoder_s = decoder_t if shared_decoders else TranslationDecoder(channels, channels=16)
    disc = (8, 8, 8, 8)
    d_s, d_t = PatchDiscriminator(1, disc), PatchDiscriminator(1, disc)
    dp = [PatchDiscriminator(CLASSES, disc), PatchDiscriminator(CLASSES, disc)]
    dtp = [PatchDiscriminator(CLASSES, disc), PatchDiscriminator(CLASSES, disc)] if unshared_discriminators else dp
    adam = functools.partial(torch.optim.Adam, fused=fused_adam)
    return DSANTrainer(
        device="cpu", max_epochs=max_epochs, epoch_length=1, data_loader=batches(size, count=4),
        segmenter=segmenter, translation_encoder=translation_encoder, decoder_s=decoder_s, decoder_t=decoder_t,
        image_discriminator_s=d_s, image_discriminator_t=d_t, prediction_discriminators=dp,
        translated_prediction_discriminators=dtp, segmentation_loss=segmentation_loss_factory(CLASSES),
        optimizer_seg=adam(unique_parameters(segmenter, translation_encoder), lr=2e-4),
        optimizer_dec=adam(unique_parameters(decoder_s, decoder_t), lr=1e-3),
        optimizer_d_image=adam(unique_parameters(d_s, d_t), lr=1e-4),
        optimizer_d_pred=adam(unique_parameters(*dp, *dtp), lr=5e-5),
        **kwargs,
    )


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def changed(before: list[torch.Tensor], params) -> list[bool]:
    return [not torch.equal(b, p.detach()) for b, p in zip(before, params)]


def optimiser_params(trainer: DSANTrainer) -> dict[str, list[nn.Parameter]]:
    optimisers = (*trainer.generator_optimizers, *trainer.discriminator_optimizers)
    names = ("seg", "dec", "d_image", "d_pred")
    return {n: [p for g in o.param_groups for p in g["params"]] for n, o in zip(names, optimisers)}


def disc_params(trainer: DSANTrainer) -> list[nn.Parameter]:
    return list(unique_parameters(*trainer.discriminators))


def test_one_iteration_updates_every_parameter_of_every_optimiser() -> None:
    trainer = make_trainer()
    params = optimiser_params(trainer)
    before = {n: snapshot(ps) for n, ps in params.items()}
    trainer.run()
    for name, ps in params.items():
        moved = changed(before[name], ps)
        assert all(moved), f"optimiser {name}: {moved.count(False)} of {len(ps)} parameters did not change"


def test_generator_step_leaves_discriminators_alone_and_discriminator_step_the_generator() -> None:
    trainer = make_trainer()
    d_params = disc_params(trainer)
    d_before = snapshot(d_params)
    e_params = list(trainer.segmenter.encoder.parameters())
    u_params = list(unique_parameters(trainer.decoder_s, trainer.decoder_t))
    seen = []
    original_step = trainer._step

    def spy(loss, optimizers):
        original_step(loss, optimizers)
        seen.append({
            "d_grads": [p.grad for p in d_params],
            "d_changed": any(changed(d_before, d_params)),
            "e_grads": [None if p.grad is None else p.grad.clone() for p in e_params],
            "u_grads": [p.grad for p in u_params],
        })

    trainer._step = spy
    trainer.run()
    generator_step, discriminator_step = seen
    assert all(g is None for g in generator_step["d_grads"])
    assert not generator_step["d_changed"]
    assert all(g is not None and g.abs().sum() > 0 for g in generator_step["e_grads"])
    assert all(g is not None for g in generator_step["u_grads"])
    assert all(g is not None for g in discriminator_step["d_grads"])
    assert discriminator_step["d_changed"]
    # the discriminator step trains on detached fakes: E's gradients are still those of the generator step
    for g_step, d_step in zip(generator_step["e_grads"], discriminator_step["e_grads"]):
        torch.testing.assert_close(g_step, d_step)


def test_output_names_every_loss_term() -> None:
    trainer = make_trainer()
    trainer.run()
    out = trainer.state.output
    expected = {"loss", "loss_rec_t", "loss_adv_t", "loss_gen_t", "loss_rec_s", "loss_adv_s", "loss_gen_s",
                "loss_seg_s", "loss_seg_s2t", "loss_adv_p", "loss_adv_tp", "loss_adv_sec",
                "loss_d_t", "loss_d_s", "loss_d_p", "loss_d_tp", "w1_s2t_t", "w1_t2s_s", "w1_s_t"}
    assert set(out) == expected
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    eq12 = 1.0 * (out["loss_gen_t"] + out["loss_gen_s"]) + 1.0 * (out["loss_seg_s"] + out["loss_seg_s2t"]) \
        + 0.1 * out["loss_adv_sec"]
    torch.testing.assert_close(out["loss"], eq12)


def test_source_warmup_trains_the_segmenter_alone_then_every_term() -> None:
    trainer = make_trainer(source_warmup=2, max_epochs=3)
    params = optimiser_params(trainer)
    before = {n: snapshot(ps) for n, ps in params.items()}
    outputs, unchanged_after_warmup = [], {}

    def record(engine: Engine) -> None:
        outputs.append(set(engine.state.output))
        if engine.state.iteration == 2:
            unchanged_after_warmup.update({n: not any(changed(before[n], params[n])) for n in params})

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    assert outputs[:2] == [{"loss", "loss_seg_s"}] * 2
    assert unchanged_after_warmup == {"seg": False, "dec": True, "d_image": True, "d_pred": True}
    assert {"loss_adv_sec", "loss_d_t", "w1_s2t_t"} <= outputs[2]  # then the full Eq. (12)
    assert all(changed(before["d_pred"], params["d_pred"]))


def test_source_only_trains_the_segmenter_alone() -> None:
    trainer = make_trainer(terms=["seg_s"])
    params = optimiser_params(trainer)
    before = {n: snapshot(ps) for n, ps in params.items()}
    trainer.run()
    assert set(trainer.state.output) == {"loss", "loss_seg_s"}
    torch.testing.assert_close(trainer.state.output["loss"], trainer.state.output["loss_seg_s"])
    assert all(changed(before["seg"], params["seg"]))
    for name in ("dec", "d_image", "d_pred"):
        assert not any(changed(before[name], params[name])), name


def stem_batch_mean(trainer: DSANTrainer, image: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of E's first convolution on ``image``: what E's first batch norm sees."""
    with torch.no_grad():
        return trainer.segmenter.encoder.conv1(image).mean(dim=(0, 2, 3))


@pytest.mark.parametrize("running_stats,terms,tracked", [
    ("target", None, "target"),  # only the x_t pass updates the running statistics
    ("all", None, "other"),  # the last pass (a translated batch) wrote them last
    ("target", ["seg_s"], "source"),  # no x_t pass this iteration: x_s updates them, evaluation keeps working
])
def test_running_statistics_follow_the_chosen_passes(running_stats: str, terms: list | None, tracked: str) -> None:
    trainer = make_trainer(running_stats=running_stats, **({"terms": terms} if terms else {}))
    for m in trainer.segmenter.encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running statistics = those of the last batch that updated them
    batch = next(iter(batches()))
    source_mean = stem_batch_mean(trainer, batch["source_image"])
    target_mean = stem_batch_mean(trainer, batch["target_image"])
    trainer.run()
    running = trainer.segmenter.encoder.bn1.running_mean
    assert torch.allclose(running, target_mean, atol=1e-6) == (tracked == "target")
    assert torch.allclose(running, source_mean, atol=1e-6) == (tracked == "source")
    assert trainer.segmenter.encoder.bn1.momentum == 1.0  # restored after each pass


@pytest.mark.parametrize("variant", ["shared_decoders", "unshared_encoders", "unshared_discriminators"])
def test_table_v_variants_train(variant: str) -> None:
    trainer = make_trainer(**{variant: True})
    params = optimiser_params(trainer)
    before = {n: snapshot(ps) for n, ps in params.items()}
    trainer.run()
    for name, ps in params.items():
        assert all(changed(before[name], ps)), f"{variant}: optimiser {name}"
    if variant == "unshared_encoders":
        assert trainer.translation_encoder is not trainer.segmenter.encoder
    if variant == "unshared_discriminators":
        assert "loss_d_tp" in trainer.state.output


def test_bce_gan_mode_runs() -> None:
    trainer = make_trainer(gan_mode="bce")
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])


@pytest.mark.parametrize("kwargs,message", [
    ({"terms": ["seg_s", "gen_x"]}, "terms must be"),
    ({"terms": []}, "terms must be"),
    ({"gan_mode": "wgan"}, "gan_mode"),
    ({"running_stats": "source"}, "running_stats"),
])
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_trainer(**kwargs)


def test_budget_must_be_a_multiple_of_the_validation_interval() -> None:
    assert epochs_for(20000, 500) == 40
    for bad in ((10, 3), (0, 5), (10, 0)):
        with pytest.raises(ValueError, match="multiple of val_interval"):
            epochs_for(*bad)


def test_passes_are_planned_from_the_active_terms() -> None:
    full = planned_passes(["gen_t", "gen_s", "seg_s", "seg_s2t", "adv_sec"])
    assert full == (["rec_t", "x_s2t", "rec_s", "x_t2s", "logits_s", "logits_s2t", "logits_t", "logits_t2s"], [])
    assert planned_passes(["seg_s"]) == (["logits_s"], [])
    # D_p_i compares source maps with target maps: without L_seg^s and L_seg^s->t the generator step reads
    # neither logits_s nor logits_s2t, so they are the discriminator step's own passes
    assert planned_passes(["gen_t", "gen_s", "adv_sec"]) == (
        ["rec_t", "x_s2t", "rec_s", "x_t2s", "logits_t", "logits_t2s"], ["logits_s", "logits_s2t"])


def test_every_pass_runs_before_the_generator_step(monkeypatch) -> None:
    trainer = make_trainer(terms=["gen_t", "gen_s", "seg_s2t", "adv_sec"])
    at_seal = {}
    original_seal = DSANForward.seal

    def spy(self) -> None:
        at_seal.update({name: value for name, value in vars(self).items() if name.startswith(("logits", "x_s2t"))})
        original_seal(self)

    monkeypatch.setattr(DSANForward, "seal", spy)
    trainer.run()
    assert set(at_seal) == {"x_s2t", "logits_s", "logits_s2t", "logits_t", "logits_t2s"}
    # logits_s only feeds D_p_i's real side: computed before the generator step, on the same weights, no graph
    assert not any(level.requires_grad for level in at_seal["logits_s"])
    assert all(level.requires_grad for level in at_seal["logits_t"])


def test_a_sealed_forward_refuses_an_unplanned_pass() -> None:
    trainer = make_trainer()
    batch = next(iter(batches()))
    forward = DSANForward(trainer, batch["source_image"], batch["target_image"])
    forward.run(["logits_t"])
    forward.seal()
    assert forward.logits_t is forward.logits_t  # planned: read again from the cache
    with pytest.raises(RuntimeError, match="'logits_s' was not planned"):
        _ = forward.logits_s


def loss_history(trainer: DSANTrainer) -> list[dict[str, float]]:
    history: list[dict[str, float]] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda engine: history.append({k: float(v) for k, v in engine.state.output.items()}))
    trainer.run()
    return history


def one_call_per_pass_discriminator_loss(discriminator, real, fake, mode="lsgan"):
    return 0.5 * (losses.gan_loss(discriminator(real), True, mode)
                  + losses.gan_loss(discriminator(fake.detach()), False, mode))


@pytest.fixture
def one_call_per_pass(monkeypatch):
    """Switches off the speed-ups that change no value: every ASPP tap computed (padding included), each
    discriminator called once on real and once on fake images, each decoder once per pass."""

    def switch_off() -> None:
        monkeypatch.setattr(DilatedConv2d, "forward", nn.Conv2d.forward)
        monkeypatch.setattr(losses, "discriminator_loss", one_call_per_pass_discriminator_loss)
        monkeypatch.setattr(DSANForward, "_decoded_together", lambda self, own, other: False)

    return switch_off


def assert_same_losses(got: list[dict[str, float]], expected: list[dict[str, float]]) -> None:
    assert len(got) == len(expected)
    for iteration, (values, reference) in enumerate(zip(got, expected), start=1):
        assert values.keys() == reference.keys()
        for name, value in reference.items():
            assert values[name] == pytest.approx(value, rel=1e-5, abs=1e-5), f"{name} at iteration {iteration}"


def test_reachable_taps_train_as_the_full_aspp_kernels_for_20_iterations(monkeypatch) -> None:
    # float64, so that the comparison sees the computation, not float32 rounding; 64x64 crops give 8x8 features,
    # where rate 6 keeps its 3x3 kernel and rates 12-24 reduce to 1x1
    torch.set_default_dtype(torch.float64)
    try:
        fast = loss_history(make_trainer(max_epochs=20, size=64))
        monkeypatch.setattr(DilatedConv2d, "forward", nn.Conv2d.forward)
        reference = loss_history(make_trainer(max_epochs=20, size=64))
    finally:
        torch.set_default_dtype(torch.float32)
    assert_same_losses(fast, reference)


def test_every_speed_up_computes_the_losses_of_one_call_per_pass(one_call_per_pass) -> None:
    # one iteration: from the next, Adam turns rounding differences in gradients that are zero in exact arithmetic
    # (the biases before instance norm) into steps of the learning rate's size, and the runs part (docs/speed.md)
    torch.set_default_dtype(torch.float64)
    try:
        fast = loss_history(make_trainer(size=64, fused_adam=True, channels_last=True))
        one_call_per_pass()
        reference = loss_history(make_trainer(size=64))
    finally:
        torch.set_default_dtype(torch.float32)
    assert_same_losses(fast, reference)


def test_amp_uses_one_gradient_scaler() -> None:
    trainer = make_trainer(amp=True)
    scalers = [value for value in vars(trainer).values() if isinstance(value, torch.amp.GradScaler)]
    assert scalers == [trainer.scaler] and trainer.scaler.is_enabled()
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])
    assert not make_trainer().scaler.is_enabled()


def test_amp_and_channels_last_switches_run_on_cpu() -> None:
    trainer = make_trainer(amp=True, channels_last=True)
    trainer.run()
    assert torch.isfinite(trainer.state.output["loss"])
    assert trainer.segmenter.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("running_stats", ["target", "all"])
def test_the_benchmarks_bare_loop_makes_the_trainers_update(running_stats: str) -> None:
    import copy

    from scripts.benchmark import (
        NETWORK_IDS,
        bare_runner,
        build_components,
        bundle_runner,
        fixed_batches,
        synthetic_batches,
    )

    cpu = torch.device("cpu")
    parts = build_components("demo", cpu)
    parts["running_stats"] = running_stats
    batches = synthetic_batches(parts, cpu)
    trained, bare = copy.deepcopy(parts), copy.deepcopy(parts)
    bundle_runner(trained, fixed_batches(*batches), cpu, iterations=1)()
    bare_runner(bare, lambda: batches, iterations=1)()
    for key in NETWORK_IDS:
        modules = (trained[key], bare[key]) if isinstance(trained[key], nn.Module) else \
            (nn.ModuleList(trained[key]), nn.ModuleList(bare[key]))
        expected, got = (m.state_dict() for m in modules)
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{key}.{name}")


def test_benchmark_runs_both_loops_and_reports_their_ratio_and_the_data_share(capsys, tiny_dataset) -> None:
    from scripts.benchmark import benchmark

    result = benchmark(profile="demo", iterations=2, rounds=1, device="cpu", dataset_dir=tiny_dataset.parent)
    assert all(result[f"{name}_s_per_it"] > 0 for name in ("bundle", "bare", "data", "source_only",
                                                           "source_only_data"))
    assert result["ratio"] == pytest.approx(result["bundle_s_per_it"] / result["bare_s_per_it"])
    assert result["data_share"] == pytest.approx(result["data_s_per_it"] / result["bundle_s_per_it"])
    assert 0 < result["source_only_data_share"] < 1  # its iteration includes its data loading
    out = capsys.readouterr().out
    assert "ratio bundle/bare" in out and "source-only iteration" in out and "of a 2048x2048 fp32 matmul" in out


def test_plain_tensor_sampling_draws_crops_of_the_cached_volumes(bundle_root, tiny_dataset, tmp_path) -> None:
    from scripts.benchmark import PlainTensorSampling
    from tests.conftest import TINY
    from tests.test_configs import data_overrides, parser_for

    parser = parser_for(bundle_root, ["configs/demo.yaml"], **data_overrides(tiny_dataset, tmp_path), **TINY,
                        rotation_range=0.0)
    source, target = PlainTensorSampling.like(parser, torch.device("cpu"))()
    assert source["image"].shape == source["label"].shape == target["image"].shape == (2, 1, 32, 32)
    assert "label" not in target
    # unrotated (rotation_range 0), each label crop holds only the classes of the cached label volumes
    classes = set(torch.cat([v["label"].as_tensor().flatten()
                             for v in parser.get_parsed_content("train#dataset")._cache]).unique().tolist())
    assert set(source["label"].unique().tolist()) <= classes
    assert float(source["image"].min()) >= -1 and float(source["image"].max()) <= 1


def test_wall_clock_budget_stops_at_the_last_validation_that_fits_and_keeps_marked_models(
        tmp_path, monkeypatch) -> None:
    clock = {"now": 0.0}
    monkeypatch.setattr("scripts.trainer.time.perf_counter", lambda: clock["now"])
    best = tmp_path / "model.pt"

    def one_minute_iteration(engine: Engine, batch: object) -> None:
        clock["now"] += 60.0
        best.write_text(f"best after iteration {engine.state.iteration}")  # what the best-model saver would do
        best.with_suffix(".json").write_text(f"settings after iteration {engine.state.iteration}")

    engine = Engine(one_minute_iteration)
    decoder = nn.Linear(2, 2)  # stands for DSANTrainer.auxiliary_networks
    engine.auxiliary_networks = {"decoder_t": decoder}
    weights_at = {}

    @engine.on(Events.EPOCH_COMPLETED)
    def step_the_decoder(engine: Engine) -> None:  # the networks move on after every validation
        with torch.no_grad():
            decoder.weight.add_(1.0)
        weights_at[engine.state.iteration] = decoder.weight.detach().clone()

    WallClockBudget(minutes=3.5, marks=[2.0], best_model=best).attach(engine)
    engine.run(range(1), max_epochs=100)
    # epochs end at 1, 2, 3 minutes; a fourth would end at 4 > 3.5, so training stops after the third
    assert engine.state.epoch == 3
    # the last validation within 2 minutes is at 2 minutes: its best model is kept for the 2-minute budget
    assert (tmp_path / "model_2min.pt").read_text() == "best after iteration 2"
    assert (tmp_path / "model_2min.json").read_text() == "settings after iteration 2"  # its model.json with it
    marks = json.loads((tmp_path / "budget_marks.json").read_text())
    assert marks == {"2": {"model": "model_2min.pt", "auxiliary": "auxiliary_2min.pt", "iteration": 2,
                           "elapsed_s": 120.0}}
    # the other networks as they were at that validation (iteration 2), not as training left them
    kept = torch.load(tmp_path / "auxiliary_2min.pt", weights_only=True)
    assert set(kept) == {"decoder_t"}
    assert torch.equal(kept["decoder_t"]["weight"], weights_at[2])
    assert not torch.equal(kept["decoder_t"]["weight"], decoder.weight)


@pytest.mark.parametrize("max_minutes, eta", [(None, "ETA 16:38:00  loss"), (30, "ETA 28:00 (the 30 min budget)"),
                                              (6000, "ETA 16:38:00  loss")])
def test_the_eta_is_the_nearer_of_max_iterations_and_the_wall_clock_budget(monkeypatch, caplog, max_minutes,
                                                                           eta) -> None:
    from scripts.reporting import ProgressLogger

    clock = {"now": 0.0}
    monkeypatch.setattr("scripts.reporting.time.perf_counter", lambda: clock["now"])

    def one_minute_iteration(engine: Engine, batch: object) -> dict:
        clock["now"] += 60.0
        return {"loss": 1.0}

    engine = Engine(one_minute_iteration)
    ProgressLogger(interval=2, max_minutes=max_minutes).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=2), lambda e: e.terminate())
    with caplog.at_level("INFO", logger="dsan"):
        engine.run(range(1), max_epochs=1000)  # 998 one-minute iterations left after the second
    assert f"iter 2/1000  60.00 s/it  {eta}" in caplog.text


def test_previews_translate_as_the_training_passes_do(tmp_path) -> None:
    import copy

    from scripts.reporting import TranslationPreview

    trainer = make_trainer()
    encoder = trainer.translation_encoder
    for m in encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0)  # running statistics of another domain (running_stats: target)
    encoder.eval()
    batch = next(iter(batches()))
    preview = TranslationPreview(tmp_path)
    preview._fixed = (batch["source_image"], batch["target_image"])
    images = preview.translate(trainer)
    training_encoder, training_decoder = copy.deepcopy(encoder).train(), copy.deepcopy(trainer.decoder_t).train()
    with torch.no_grad():
        expected = training_decoder(training_encoder(batch["source_image"])[1])
    torch.testing.assert_close(images["x_s->t"], expected)
    assert not encoder.training  # its mode is restored
    assert all(torch.all(m.running_mean == 3.0) for m in encoder.modules() if isinstance(m, nn.BatchNorm2d))
