"""The one datasets registry: every stage that loads labelled images (zoo families, D2NWG's dataset
conditions, learngene's tasks) gets them from rayweights.datasets."""

from __future__ import annotations

import pytest
import torch

from rayweights.conditioning import ConditioningError, dataset_features
from rayweights.datasets import DATASETS, check_dataset, load_dataset, num_classes, register_dataset
from rayweights.learngene.tasks import DigitsTask

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture()
def stripes():
    """A registered argument-free dataset: 3 classes of 4x4 images, a bright row at the class index."""
    @register_dataset("stripes", needs_argument=False)
    def _stripes(arg, image_size):
        g = torch.Generator().manual_seed(0)
        y = torch.arange(60) % 3
        X = torch.rand(60, 1, 4, 4, generator=g) * 0.1 - 0.5
        X[torch.arange(60), 0, y] += 0.8
        return X, y

    yield "stripes"
    DATASETS.pop("stripes", None)
    load_dataset.cache_clear()


def test_a_registered_dataset_serves_every_stage(stripes):
    X, y = load_dataset(stripes)
    assert X.shape == (60, 1, 4, 4) and num_classes(stripes) == 3
    check_dataset(stripes)
    # D2NWG conditions on it without a zoo (before the registry only digits could be named)
    f = dataset_features(f"{stripes}:0,2", samples_per_class=5, seed=1)
    assert f.shape == (2, 5, 16)
    rows = f.view(2, 5, 4, 4).mean(-1).mean(1)          # mean brightness of each image row, per class
    assert rows[0].argmax() == 0 and rows[1].argmax() == 2    # the examples of classes 0 and 2, in that order
    with pytest.raises(ConditioningError, match="stripes has classes 0-2, not 3"):
        dataset_features(f"{stripes}:0,3")


def test_one_digits_loader():
    X, y = load_dataset("digits")
    assert X.shape == (1797, 1, 8, 8) and float(X.min()) == -0.5 and float(X.max()) == 0.5
    task = DigitsTask(val_fraction=0.3)                   # learngene's digits are the registry's digits
    assert len(task.train_x) + len(task.val_x) == len(y)
    assert torch.equal(torch.cat([task.train_x, task.val_x]).sort(0).values, X.sort(0).values)


def test_unknown_and_malformed_names_fail_naming_the_field():
    for name in ("mnist-from-the-internet", "digits:3", "imagefolder", "torchvision:MNIST"):
        with pytest.raises(ValueError, match="dataset: "):
            check_dataset(name)
    with pytest.raises(ConditioningError, match="no dataset named 'cifar'"):
        dataset_features("cifar:0,1")
