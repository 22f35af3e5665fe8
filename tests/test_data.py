"""The training data stream: fast draws give the pixels MONAI's own seeding and metadata tracking give, the cache
is never written, and a source-only run draws no target batch."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import Compose, RandGaussianNoised, Randomizable, RandSpatialCropd

from scripts.data import SeededItems, SeededRandomSampler, UnpairedBatches, reseed_in_place, reseeds_as_monai
from scripts.trainer import reads_target_images
from tests.conftest import TINY
from tests.test_configs import data_overrides, parser_for


def training_parser(bundle_root, tiny_dataset, tmp_path, files=("configs/demo.yaml",)):
    return parser_for(bundle_root, list(files), **data_overrides(tiny_dataset, tmp_path), **TINY,
                      device="$torch.device('cpu')")


def test_seeded_items_give_the_pixels_of_monai_seeding_with_metadata(bundle_root, tiny_dataset, tmp_path) -> None:
    parser = training_parser(bundle_root, tiny_dataset, tmp_path)
    fast = SeededItems(parser.get_parsed_content("train#dataset"))
    # the stream as it was: MONAI's set_random_state per item, a deep copy of the cached item, metadata tracked
    reference = CacheDataset(parser.get_parsed_content("train#dataset#data"),
                             transform=parser.get_parsed_content("train#transforms"), copy_cache=True)
    draws = list(SeededRandomSampler(reference, num_samples=24, seed=3))
    rotated = 0
    for index, seed in draws:
        reference.transform.set_random_state(seed=seed)
        expected, item = reference[index], fast[(index, seed)]
        for key in ("image", "label"):
            assert type(item[key]) is torch.Tensor  # no MetaTensor bookkeeping
            torch.testing.assert_close(item[key], expected[key].as_tensor(), rtol=0, atol=0)
        rotated += any(op["class"] == "RandRotated" and op["do_transforms"]
                       for op in expected["image"].applied_operations)
    assert fast.reseed is reseed_in_place
    assert 0 < rotated < len(draws)  # both rotated and unrotated items were compared


def test_reseeding_in_place_equals_set_random_state_for_nested_dictionary_transforms() -> None:
    transform = Compose([RandSpatialCropd("image", roi_size=[4, 4]), RandGaussianNoised("image", prob=1.0)])
    assert reseeds_as_monai(transform)
    image = {"image": torch.arange(64.0).reshape(1, 8, 8)}
    by_monai = transform.set_random_state(seed=7)(dict(image))
    transform.set_random_state(seed=0)
    reseed_in_place(transform, 7)
    torch.testing.assert_close(transform(dict(image))["image"].as_tensor(), by_monai["image"].as_tensor())


class OwnSeeding(Randomizable):
    """A custom transform whose set_random_state does something reseed_in_place cannot know."""

    def set_random_state(self, seed=None, state=None):
        return super().set_random_state(seed=None if seed is None else seed + 1)

    def randomize(self, data=None) -> None:
        self.value = self.R.rand()

    def __call__(self, data):
        self.randomize()
        return {**data, "value": self.value}


def test_a_transform_with_its_own_seeding_rules_falls_back_to_set_random_state() -> None:
    dataset = CacheDataset([{"image": np.zeros((1, 4, 4), np.float32)}], transform=Compose([OwnSeeding()]))
    assert not reseeds_as_monai(dataset.transform)
    items = SeededItems(dataset)
    assert items.reseed is not reseed_in_place
    expected = Compose([OwnSeeding()]).set_random_state(seed=5)({"image": 0})["value"]
    assert items[(0, 5)]["value"] == expected


def test_drawing_batches_and_writing_into_them_leaves_the_cache_untouched(bundle_root, tiny_dataset, tmp_path) -> None:
    parser = training_parser(bundle_root, tiny_dataset, tmp_path)
    dataset = parser.get_parsed_content("train#dataset")
    assert dataset.copy_cache is False
    cached = [{k: v.clone() for k, v in item.items() if isinstance(v, torch.Tensor)} for item in dataset._cache]
    stream = iter(parser.get_parsed_content("train#batches"))
    for _ in range(6):
        batch = next(stream)
        for value in batch.values():
            value.fill_(123.0)  # a trainer writing into its batch must not reach the cache
    for before, item in zip(cached, dataset._cache):
        for key, value in before.items():
            torch.testing.assert_close(item[key], value, rtol=0, atol=0)


def test_source_only_draws_no_target_batch_and_trains(bundle_root, tiny_dataset, tmp_path) -> None:
    assert not reads_target_images(["seg_s"]) and not reads_target_images(["seg_s", "seg_s2t"])
    assert all(reads_target_images(["seg_s", term]) for term in ("gen_t", "gen_s", "adv_sec"))
    parser = training_parser(bundle_root, tiny_dataset, tmp_path, ("configs/demo.yaml", "configs/source_only.yaml"))
    parser.update({"max_iterations": 3, "val_interval": 3})
    stream = parser.get_parsed_content("train#batches")
    assert stream.target_loader is None
    assert set(next(iter(stream))) == {"source_image", "source_label"}
    trainer = parser.get_parsed_content("train#trainer")
    trainer.run()
    assert trainer.state.iteration == 3 and torch.isfinite(trainer.state.output["loss_seg_s"])
    dsan = training_parser(bundle_root, tiny_dataset, tmp_path / "dsan").get_parsed_content("train#batches")
    assert set(next(iter(dsan))) == {"source_image", "source_label", "target_image"}


def test_unpaired_batches_without_target_loader_yield_the_source_batches() -> None:
    source = [{"image": torch.full((1, 1, 2, 2), float(i)), "label": torch.zeros(1, 1, 2, 2)} for i in range(2)]
    stream = iter(UnpairedBatches(source))
    assert [float(next(stream)["source_image"].max()) for _ in range(4)] == [0.0, 1.0, 0.0, 1.0]
