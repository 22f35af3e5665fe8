"""Speed and memory benchmarks (printed, never asserted: machines are noisy).

    python -m scripts benchmark training                  # DSAN trainer vs a bare PyTorch loop, demo profile
    python -m scripts benchmark training --dataset_dir DIR  # the same on your own data (DIR/datalist.json)
    python -m scripts benchmark training --profile paper  # paper sizes (ResNet-50, 256x256, batch 8), for CUDA
    python -m scripts benchmark inference                 # configs/inference.yaml vs a bare batched forward
    python -m scripts benchmark memory                    # peak memory of inference on a 512x512x300 volume
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from scripts import data, losses
from scripts.networks import running_stats_kept, set_requires_grad
from scripts.setups import BUNDLE_ROOT, PROFILES, bundle_config
from scripts.trainer import TERMS, DSANTrainer

NETWORK_IDS = ["network", "decoder_s", "decoder_t", "image_discriminator_s", "image_discriminator_t",
               "prediction_discriminators"]
OPTIMIZER_IDS = ["optimizer_seg", "optimizer_dec", "optimizer_d_image", "optimizer_d_pred"]


def profile_parser(profile: str, device: torch.device, dataset_dir: str | Path | None = None) -> ConfigParser:
    """The bundle's configs of a profile, on ``device``, reading ``dataset_dir``'s datalist.json when given."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    parser = bundle_config(profile, "full", device=f"$torch.device('{device}')")
    if dataset_dir is not None:
        parser["dataset_dir"] = str(dataset_dir)
        parser["datalist"] = str(Path(dataset_dir) / "datalist.json")
    return parser


def build_components(profile: str | ConfigParser, device: torch.device) -> dict:
    """Networks, optimisers and settings of a profile (or of a parser's configs), instantiated from the bundle's
    configs."""
    parser = profile_parser(profile, device) if isinstance(profile, str) else profile
    parts = {key: parser.get_parsed_content(key) for key in NETWORK_IDS + OPTIMIZER_IDS}
    parts["segmentation_loss"] = parser.get_parsed_content("train#segmentation_loss")
    for key in ("batch_size", "roi_size", "num_classes", "lambda_rec", "lambda_adv", "lambda_gen", "lambda_seg",
                "lambda_secadv", "gan_mode", "running_stats", "amp", "channels_last"):
        parts[key] = parser.get_parsed_content(key)
    return parts


def synthetic_batches(parts: dict, device: torch.device) -> tuple[dict, dict]:
    """One source batch (image, label) and one target batch (image), as the data loaders give them."""
    gen = torch.Generator().manual_seed(0)
    shape = (parts["batch_size"], 1, parts["roi_size"], parts["roi_size"])
    source = {"image": (torch.rand(shape, generator=gen) * 2 - 1).to(device),
              "label": torch.randint(0, parts["num_classes"], shape, generator=gen).float().to(device)}
    target = {"image": (torch.rand(shape, generator=gen) * 2 - 1).to(device)}
    return source, target


class PlainTensorSampling:
    """Training batches as a bare PyTorch loop would draw them: the preprocessed volumes of the configs' caches
    as plain tensors, a random ``roi_size`` square of a random slice of a random volume per item, each rotated
    with probability ``prob`` by an angle in +-``rotation_range`` (bilinear image, nearest label, border
    padding) in one batched grid_sample: the crops and rotations of configs/train.yaml's augmentation, drawn
    with torch alone. Calling it gives the next (source, target) batches."""

    def __init__(self, source_volumes: list[dict], target_volumes: list[dict], batch_size: int, roi_size: int,
                 rotation_range: float, prob: float, device: torch.device, seed: int = 0) -> None:
        self.source = [(v["image"].as_tensor(), v["label"].as_tensor()) for v in source_volumes]
        self.target = [(v["image"].as_tensor(), None) for v in target_volumes]
        self.batch_size, self.roi_size, self.device = batch_size, roi_size, device
        self.rotation_range, self.prob = rotation_range, prob
        self.gen = torch.Generator().manual_seed(seed)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.gen))

    def _crop(self, volumes: list[tuple]) -> tuple[torch.Tensor, torch.Tensor | None]:
        image, label = volumes[self._randint(len(volumes))]
        r = self.roi_size
        y, x, z = (self._randint(side - size + 1) for side, size in zip(image.shape[1:], (r, r, 1)))
        window = (slice(None), slice(y, y + r), slice(x, x + r), z)
        return image[window], None if label is None else label[window]

    def _rotate(self, images: torch.Tensor, mode: str, angles: torch.Tensor) -> torch.Tensor:
        cos, sin, zero = angles.cos(), angles.sin(), torch.zeros_like(angles)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
        return torch.nn.functional.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)

    def _batch(self, volumes: list[tuple]) -> dict:
        crops = [self._crop(volumes) for _ in range(self.batch_size)]
        rotated = torch.rand(self.batch_size, generator=self.gen) < self.prob
        angles = (torch.rand(self.batch_size, generator=self.gen) * 2 - 1) * self.rotation_range * rotated
        batch = {"image": self._rotate(torch.stack([c[0] for c in crops]), "bilinear", angles).to(self.device)}
        if crops[0][1] is not None:
            batch["label"] = self._rotate(torch.stack([c[1] for c in crops]), "nearest", angles).to(self.device)
        return batch

    def __call__(self) -> tuple[dict, dict]:
        return self._batch(self.source), self._batch(self.target)

    @classmethod
    def like(cls, parser: ConfigParser, device: torch.device) -> PlainTensorSampling:
        """The sampling of the configs in ``parser``, from the volumes its training datasets cached."""
        rotation = next(t for t in parser["augmentation"] if t["_target_"] == "RandRotated")
        return cls(parser.get_parsed_content("train#dataset")._cache,
                   parser.get_parsed_content("train#target_dataset")._cache, parser.get_parsed_content("batch_size"),
                   parser.get_parsed_content("roi_size"), parser.get_parsed_content("rotation_range"),
                   rotation["prob"], device)


def bundle_runner(parts: dict, batches: Iterable[dict], device: torch.device, iterations: int,
                  terms: Sequence[str] = TERMS) -> Callable[[], None]:
    """One call = ``iterations`` iterations of the bundle's DSANTrainer (one more engine epoch) on the
    ``UnpairedBatches``-like stream ``batches``, with the ``terms`` of Eq. (12) on."""
    trainer = DSANTrainer(
        device=device, max_epochs=1, epoch_length=iterations, data_loader=batches,
        segmenter=parts["network"], decoder_s=parts["decoder_s"], decoder_t=parts["decoder_t"],
        image_discriminator_s=parts["image_discriminator_s"], image_discriminator_t=parts["image_discriminator_t"],
        prediction_discriminators=parts["prediction_discriminators"], segmentation_loss=parts["segmentation_loss"],
        optimizer_seg=parts["optimizer_seg"], optimizer_dec=parts["optimizer_dec"],
        optimizer_d_image=parts["optimizer_d_image"], optimizer_d_pred=parts["optimizer_d_pred"], terms=terms,
        lambda_rec=parts["lambda_rec"], lambda_adv=parts["lambda_adv"], lambda_gen=parts["lambda_gen"],
        lambda_seg=parts["lambda_seg"], lambda_secadv=parts["lambda_secadv"], gan_mode=parts["gan_mode"],
        running_stats=parts["running_stats"], amp=parts["amp"], channels_last=parts["channels_last"],
    )

    def run_epoch() -> None:
        trainer.run()
        trainer.state.max_epochs += 1  # the next call runs one more epoch

    return run_epoch


def fixed_batches(source: dict, target: dict) -> data.UnpairedBatches:
    """The same source and target batch at every iteration."""
    return data.UnpairedBatches([source], [target])


def bare_runner(parts: dict, next_batches: Callable[[], tuple[dict, dict]], iterations: int) -> Callable[[], None]:
    """One call = ``iterations`` of the same DSAN iteration (every term of Eq. (12) on) as a plain PyTorch loop: the
    same loss functions (scripts.losses), gan_mode and running_stats as the trainer, in the same order of passes,
    without the engine, its handlers or its planning of passes, on the (source, target) batches ``next_batches()``
    gives at each iteration: the reference the trainer's overhead is measured against."""
    seg, us, ut = parts["network"], parts["decoder_s"], parts["decoder_t"]
    ds, dt, dps = parts["image_discriminator_s"], parts["image_discriminator_t"], parts["prediction_discriminators"]
    discriminators = [ds, dt, *dps]
    seg_loss, mode = parts["segmentation_loss"], parts["gan_mode"]
    g_opts = [parts["optimizer_seg"], parts["optimizer_dec"]]
    d_opts = [parts["optimizer_d_image"], parts["optimizer_d_pred"]]
    memory_format = torch.channels_last if parts["channels_last"] else torch.contiguous_format
    for net in (seg, us, ut, *discriminators):  # as the trainer lays out its networks and images
        net.to(memory_format=memory_format)
    follow_target = parts["running_stats"] == "target"

    def encode(x: torch.Tensor, target_pass: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with running_stats_kept(seg.encoder, follow_target and not target_pass):
            return seg.encoder(x)

    def step_on(loss: torch.Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()

    def step() -> None:
        source, target = next_batches()
        x_s, y_s, x_t = source["image"], source["label"], target["image"]
        x_s, x_t = (x.contiguous(memory_format=memory_format) for x in (x_s, x_t))
        size = x_s.shape[-2:]
        for net in (seg, us, ut, *discriminators):
            net.train()
        set_requires_grad(discriminators, False)
        f_t, f_s = encode(x_t, target_pass=True), encode(x_s)
        # each decoder once on both passes' features, as the trainer does (instance norm: per-image statistics)
        rec_t, x_s2t = ut(torch.cat([f_t[1], f_s[1]])).split([len(x_t), len(x_s)])
        rec_s, x_t2s = us(torch.cat([f_s[1], f_t[1]])).split([len(x_s), len(x_t)])
        # Eq. (8) / (10) see the translations detached, as the trainer's default detach_translations does
        l_s, l_s2t = seg.classify(f_s), seg.classify(encode(x_s2t.detach()))
        l_t, l_t2s = seg.classify(f_t), seg.classify(encode(x_t2s.detach()))
        p_s, p_s2t, p_t, p_t2s = (losses.prediction_maps(lg, size) for lg in (l_s, l_s2t, l_t, l_t2s))
        # Eq. (5), (6): reconstruction (3), (4) and image adversarial (1), (2) terms
        gen_t = losses.generation_loss(losses.reconstruction_loss(rec_t, x_t),
                                       losses.image_adversarial_loss(dt, x_s2t, mode), parts["lambda_rec"],
                                       parts["lambda_adv"])
        gen_s = losses.generation_loss(losses.reconstruction_loss(rec_s, x_s),
                                       losses.image_adversarial_loss(ds, x_t2s, mode), parts["lambda_rec"],
                                       parts["lambda_adv"])
        sec = losses.semantic_loss(losses.semantic_adversarial_loss(dps, p_t, mode),  # Eq. (11) of (9), (10)
                                   losses.semantic_adversarial_loss(dps, p_t2s, mode))
        step_on(losses.total_loss(gen_t, gen_s, seg_loss(l_s, y_s), seg_loss(l_s2t, y_s), sec,  # Eq. (12), (7), (8)
                                  lambda_gen=parts["lambda_gen"], lambda_seg=parts["lambda_seg"],
                                  lambda_secadv=parts["lambda_secadv"]), g_opts)
        set_requires_grad(discriminators, True)  # the discriminators' side of Eq. (1), (2), (9), (10)
        step_on(losses.discriminator_loss(dt, x_t, x_s2t, mode) + losses.discriminator_loss(ds, x_s, x_t2s, mode)
                + losses.semantic_discriminator_loss(dps, p_s, p_t, mode)
                + losses.semantic_discriminator_loss(dps, p_s2t, p_t2s, mode), d_opts)

    def run_all() -> None:
        for _ in range(iterations):
            step()

    return run_all


def draw_runner(batches: Iterable[dict], iterations: int) -> Callable[[], None]:
    """One call = ``iterations`` items drawn from the stream ``batches``, nothing else: its data loading."""
    stream = iter(batches)

    def draw() -> None:
        for _ in range(iterations):
            next(stream)

    return draw


def seconds_per_iteration(runner: Callable[[], None], iterations: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    runner()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iterations


def alternating_medians(runners: dict[str, Callable[[], None]], iterations: int, rounds: int,
                        device: torch.device) -> dict[str, float]:
    """Median seconds per iteration of each runner over ``rounds`` rounds after an untimed warm-up, the order of
    the runners reversed every other round, so that a slow spell of the machine falls on all of them."""
    for runner in runners.values():
        runner()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(rounds):
        for name in list(runners) if round_index % 2 == 0 else list(reversed(runners)):
            times[name].append(seconds_per_iteration(runners[name], iterations, device))
    return {name: statistics.median(t) for name, t in times.items()}


def benchmark(profile: str = "demo", iterations: int = 10, rounds: int = 5, device: str | None = None,
              dataset_dir: str | Path | None = None) -> dict[str, float]:
    """Side by side, in alternating rounds on identical copies of the networks: seconds per iteration of the
    bundle's DSANTrainer fed by its configs' data pipeline, of a bare PyTorch loop fed by plain-tensor sampling
    (``PlainTensorSampling``), of the configs' data pipeline alone, and of a source-only iteration (Eq. (7)) and
    its data pipeline alone; GFLOP per iteration, the bundle's GFLOP/s and its share of a same-run matmul.
    The data are ``dataset_dir``'s datalist (your own) or, by default, a generated phantom."""
    import tempfile

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        if dataset_dir is None:
            from scripts.phantom import generate_demo_dataset

            dataset_dir = generate_demo_dataset(tmp).parent
        parser = profile_parser(profile, dev, dataset_dir)
        parts = build_components(parser, dev)
        source_only = profile_parser(profile, dev, dataset_dir)
        source_only["terms"] = ["seg_s"]
        runners = {
            "bundle": bundle_runner(copy.deepcopy(parts), parser.get_parsed_content("train#batches"), dev, iterations),
            "bare": bare_runner(copy.deepcopy(parts), PlainTensorSampling.like(parser, dev), iterations),
            "data": draw_runner(parser.get_parsed_content("train#batches"), iterations),
            "source_only": bundle_runner(copy.deepcopy(parts), source_only.get_parsed_content("train#batches"), dev,
                                         iterations, terms=["seg_s"]),
            "source_only_data": draw_runner(source_only.get_parsed_content("train#batches"), iterations),
        }
        result = {f"{name}_s_per_it": s for name, s in alternating_medians(runners, iterations, rounds, dev).items()}
    result["ratio"] = result["bundle_s_per_it"] / result["bare_s_per_it"]
    result["data_share"] = result["data_s_per_it"] / result["bundle_s_per_it"]
    result["source_only_data_share"] = result["source_only_data_s_per_it"] / result["source_only_s_per_it"]
    result["gflop_per_it"] = gflop_per_iteration(bare_runner(copy.deepcopy(parts),
                                                             lambda: synthetic_batches(parts, dev), 1))
    result["gflop_per_s"] = result["gflop_per_it"] / result["bundle_s_per_it"]
    result["matmul_gflop_per_s"] = matmul_gflop_per_second(dev)
    report_training_benchmark(result, profile, dev, parts, iterations, rounds)
    return result


def report_training_benchmark(result: dict[str, float], profile: str, device: torch.device, parts: dict,
                              iterations: int, rounds: int) -> None:
    share = result["gflop_per_s"] / result["matmul_gflop_per_s"]
    print(f"profile {profile} on {device} ({torch.get_num_threads()} threads), batch {parts['batch_size']}, "
          f"{parts['roi_size']}x{parts['roi_size']}, medians of {rounds} alternating rounds x {iterations} iterations")
    print(f"  bundle DSANTrainer, configs' data pipeline : {result['bundle_s_per_it']:.4f} s/it")
    print(f"  bare PyTorch loop, plain-tensor sampling   : {result['bare_s_per_it']:.4f} s/it")
    print(f"  ratio bundle/bare                          : {result['ratio']:.3f}  (target <= 1.05)")
    print(f"  data loading alone (configs' pipeline)     : {result['data_s_per_it']:.4f} s/it, "
          f"{100 * result['data_share']:.1f} % of the bundle's DSAN iteration")
    print(f"  source-only iteration (bundle)             : {result['source_only_s_per_it']:.4f} s/it, of which data "
          f"loading {result['source_only_data_s_per_it']:.4f} s/it = {100 * result['source_only_data_share']:.1f} % "
          "(target <= 10 %)")
    print(f"  work per DSAN iteration                    : {result['gflop_per_it']:.2f} GFLOP "
          "(torch.utils.flop_counter)")
    print(f"  bundle rate                                : {result['gflop_per_s']:.1f} GFLOP/s, {100 * share:.0f} % of "
          f"a 2048x2048 fp32 matmul on the same threads ({result['matmul_gflop_per_s']:.1f} GFLOP/s, this run; "
          "target >= 45 %)")


def gflop_per_iteration(runner: Callable[[], None]) -> float:
    """GFLOP of one call of ``runner`` as torch.utils.flop_counter counts them (convolutions and matmuls, forward
    and backward): the work an iteration asks of the hardware, whatever its speed."""
    from torch.utils.flop_counter import FlopCounterMode

    runner()  # warm-up, so that one-time work is not counted
    with FlopCounterMode(display=False) as counter:
        runner()
    return counter.get_total_flops() / 1e9


def matmul_gflop_per_second(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """What this machine's threads reach on a large fp32 matrix product now: the yardstick of the bundle's rate,
    measured in the same run since the machine's speed changes from day to day."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up

    def products() -> None:
        for _ in range(repeats):
            a @ b

    return 2 * n**3 / seconds_per_iteration(products, repeats, device) / 1e9


def synthetic_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """A NIfTI volume of random blocks on noise, for timing (content does not matter, size does)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    image = rng.normal(0, 50, shape).astype(np.float32)
    for _ in range(8):
        lo = [int(rng.integers(0, s // 2)) for s in shape]
        image[lo[0]:lo[0] + shape[0] // 4, lo[1]:lo[1] + shape[1] // 4, lo[2]:lo[2] + shape[2] // 4] += 500
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.diag([0.8, 0.8, 1.5, 1.0])), str(path))
    return path


def bundle_inference_seconds(workdir: Path, encoder_width: float, batch_size: int, device: torch.device) -> float:
    """Seconds of `run` of configs/inference.yaml over the volumes in ``workdir/in`` (load, preprocess, every
    slice through the network, invert, write), network construction and checkpoint writing excluded."""
    from monai.bundle import ConfigWorkflow

    from scripts.networks import Segmenter

    ckpt = workdir / "model.pt"
    torch.save(Segmenter(1, 5, encoder_width).state_dict(), ckpt)
    workflow = ConfigWorkflow(config_file=str(BUNDLE_ROOT / "configs" / "inference.yaml"), workflow_type="infer",
                              logging_file=False)
    workflow.parser.update({"bundle_root": str(BUNDLE_ROOT), "dataset_dir": str(workdir / "in"),
                            "output_dir": str(workdir / "out"), "ckpt_path": str(ckpt),
                            "encoder_width": encoder_width, "batch_size": batch_size,
                            # the synthetic volume is RAS: slice its third axis, as the bare loop does
                            "slice_axcodes": "RAS", "device": f"$torch.device('{device}')"})
    workflow.initialize()
    workflow.parser.get_parsed_content("evaluator")  # build networks and loaders before the clock starts
    start = time.perf_counter()
    workflow.run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def inference_slices(volume: Path) -> torch.Tensor:
    """The volume's slices preprocessed by configs/inference.yaml's own ``preprocessing`` (the synthetic volume is
    RAS: its third axis is sliced), shaped (D, 1, H, W)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "inference.yaml"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "slice_axcodes": "RAS"})
    item = next(data.preprocessed_slices([{"image": str(volume)}], parser.get_parsed_content("preprocessing")))
    return item["image"].contiguous()


def bare_inference_seconds(model: torch.nn.Module, slices: torch.Tensor, batch_size: int,
                           device: torch.device) -> float:
    """Seconds of a bare batched forward of ``model`` over every slice, with argmax to labels."""
    start = time.perf_counter()
    with torch.no_grad():
        labels = [model(slices[i:i + batch_size].to(device)).argmax(1).to("cpu", torch.uint8)
                  for i in range(0, len(slices), batch_size)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert sum(len(lab) for lab in labels) == len(slices)
    return time.perf_counter() - start


def benchmark_inference(
    shape: tuple[int, int, int] = (256, 256, 128), encoder_width: float = 1.0, batch_size: int = 8,
    rounds: int = 2, device: str | None = None,
) -> dict[str, float]:
    """Seconds per volume of the bundle's inference and of a bare batched forward over the same slices,
    medians of alternating rounds after a warm-up; throughput ratio bare / bundle (target >= 0.9)."""
    import tempfile

    from scripts.networks import Segmenter

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = Segmenter(1, 5, encoder_width).to(dev).eval()
    times: dict[str, list[float]] = {"bundle": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        slices = inference_slices(synthetic_volume(workdir / "in" / "volume.nii.gz", tuple(shape)))
        bare_inference_seconds(model, slices, batch_size, dev)  # warm-up
        for round_index in range(rounds):
            runs = {"bundle": lambda: bundle_inference_seconds(workdir, encoder_width, batch_size, dev),
                    "bare": lambda: bare_inference_seconds(model, slices, batch_size, dev)}
            for name in (list(runs) if round_index % 2 == 0 else list(reversed(runs))):
                times[name].append(runs[name]())
    bundle, bare = statistics.median(times["bundle"]), statistics.median(times["bare"])
    result = {"bundle_s_per_volume": bundle, "bare_s_per_volume": bare, "throughput_ratio": bare / bundle}
    print(f"inference of one {tuple(shape)} volume on {dev} ({torch.get_num_threads()} threads), encoder width "
          f"{encoder_width}, {batch_size} slices per forward, median of {rounds} alternating rounds")
    print(f"  bundle (configs/inference.yaml, I/O included) : {bundle:.2f} s/volume  {times['bundle']}")
    print(f"  bare batched forward + argmax                 : {bare:.2f} s/volume  {times['bare']}")
    print(f"  throughput bundle / bare                      : {result['throughput_ratio']:.3f}  (target >= 0.9)")
    return result


def peak_inference_memory(
    shape: tuple[int, int, int] = (512, 512, 300), encoder_width: float = 1.0, batch_size: int = 8
) -> float:
    """Peak resident memory (GB) of a fresh process running configs/inference.yaml on one volume of
    ``shape`` on the CPU (target < 4 GB for 512x512x300)."""
    import resource
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        synthetic_volume(workdir / "in" / "volume.nii.gz", tuple(shape))
        code = (f"import torch; from pathlib import Path; from scripts.benchmark import bundle_inference_seconds; "
                f"print(bundle_inference_seconds(Path({str(workdir)!r}), {encoder_width}, {batch_size}, "
                f"torch.device('cpu')))")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        done = subprocess.run([sys.executable, "-c", code], cwd=BUNDLE_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        raise RuntimeError("could not measure the child's peak memory (an earlier child peaked higher)")
    gb = peak_kb / 1024**2
    print(f"peak memory of inference on one {tuple(shape)} volume on cpu, encoder width {encoder_width}: {gb:.2f} GB "
          f"(target < 4 GB); inference took {float(done.stdout.strip().splitlines()[-1]):.1f} s")
    return gb
