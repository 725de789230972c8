"""Built-in datasets and models of the tools: sizes, splits, local files only, clear errors."""

import numpy as np
import paddle
import pytest

from paddle_ema.engine.data import MNIST, Cifar10, Digits, ImageFolder, batches
from paddle_ema.engine.models import LeNet, MobileNetV3Small, ResNet18
from paddle_ema.errors import ConfigError


def test_digits_split_is_fixed_and_stratified():
    train, test = Digits("train"), Digits("eval")
    assert (len(train), len(test)) == (1347, 450)
    assert train.images.shape[1:] == (1, 8, 8) and train.num_classes == 10
    counts = np.bincount(test.labels, minlength=10)
    whole = np.bincount(np.concatenate([train.labels, test.labels]), minlength=10)
    assert np.all(np.abs(counts - 450 * whole / 1797) <= 1)  # stratified: each class's share, +-1
    assert np.array_equal(Digits("eval").labels, test.labels)  # same split every time
    images, labels = test.batch(np.arange(3))
    assert images.dtype == np.float32 and images.min() >= -1 and images.max() <= 1  # (x/16 - 0.5)/0.5
    assert np.array_equal(labels, test.labels[:3])


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = batches(10, 4, True, False, seed=3, epoch=1), batches(10, 4, True, False, seed=3, epoch=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and [len(x) for x in a] == [4, 4, 2]
    assert sorted(np.concatenate(a)) == list(range(10))
    assert not np.array_equal(np.concatenate(a), np.concatenate(batches(10, 4, True, False, seed=3, epoch=2)))
    assert [len(x) for x in batches(10, 4, drop_last=True)] == [4, 4]


def test_image_folder_reads_class_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for name in ("cat", "dog"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    data = ImageFolder("train", train_root=str(tmp_path / "train"), image_size=8)
    assert data.images.shape == (6, 3, 8, 8) and list(data.labels) == [0, 0, 0, 1, 1, 1]
    assert data.class_names == ["cat", "dog"]
    grey = ImageFolder("eval", eval_root=str(tmp_path / "val"), image_size=4, grayscale=True)
    assert grey.images.shape == (4, 1, 4, 4)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ImageFolder("train", train_root="/no/such/dir"), "ImageFolder.train_root: '/no/such/dir' does not"),
        (lambda: MNIST("eval", eval_images="/x/t10k.gz", eval_labels="/x/l.gz"), "MNIST.eval_images: '/x/t10k.gz'"),
        (lambda: MNIST("train"), r"MNIST.train_images: None does not exist \(datasets are never downloaded"),
        (lambda: Cifar10("train", data_file="/x/c.tar.gz"), "Cifar10.data_file: '/x/c.tar.gz' does not exist"),
        (lambda: Digits("test"), r"split must be one of \('train', 'eval'\)"),
    ],
)
def test_missing_data_is_a_clear_error(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


@pytest.mark.parametrize("factory", [LeNet, ResNet18, MobileNetV3Small])
def test_models_take_small_single_channel_inputs(factory):
    paddle.seed(0)
    model = factory(num_classes=7, in_channels=1)
    model.eval()
    assert model(paddle.randn([2, 1, 8, 8])).shape == [2, 7]
