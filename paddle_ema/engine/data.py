"""Datasets, all read from local files (nothing is downloaded), held in memory as arrays.

Every dataset is an `ArrayDataset`: `images` (N, C, H, W) uint8 or float32, `labels` (N,) int64,
and `scale`/`mean`/`std` that turn a batch into the float32 network input
((images / scale) - mean) / std. Batching is by index arrays, so the order of an epoch is a
permutation drawn from (seed, epoch) alone and a resumed run sees the same batches.

Built in:
- Digits: scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside the sklearn package),
  split once, stratified by class, with a fixed seed: 1,347 train / 450 test by default.
- ImageFolder: class-per-folder images (`root/<class>/<image>`), resized to `image_size`.
- MNIST, FashionMNIST: the idx files (`*-images-idx3-ubyte.gz`, `*-labels-idx1-ubyte.gz`).
- Cifar10: the `cifar-10-python.tar.gz` archive.
"""

import os

import numpy as np

from ..config import register
from ..config.registry import Limit
from ..core.validation import check_choice
from ..errors import ConfigError

__all__ = ["ArrayDataset", "Digits", "ImageFolder", "MNIST", "FashionMNIST", "Cifar10", "batches"]

SPLITS = ("train", "eval")


class ArrayDataset:
    def __init__(self, images, labels, num_classes, scale=255.0, mean=0.0, std=1.0, class_names=None):
        self.images = images
        self.labels = np.asarray(labels, dtype="int64").reshape(-1)
        self.num_classes = int(num_classes)
        self.scale, self.mean, self.std = float(scale), float(mean), float(std)
        self.class_names = class_names or [str(i) for i in range(self.num_classes)]

    def __len__(self):
        return len(self.labels)

    @property
    def in_channels(self):
        return int(self.images.shape[1])

    def batch(self, indices):
        """(float32 images, int64 labels) for the given sample indices, as numpy arrays."""
        images = self.images[indices].astype("float32") / self.scale
        return (images - self.mean) / self.std, self.labels[indices]


def batches(num_samples, batch_size, shuffle=False, drop_last=False, seed=0, epoch=0):
    """Index arrays of one epoch; the permutation depends only on (seed, epoch)."""
    order = np.random.RandomState([seed, epoch]).permutation(num_samples) if shuffle else np.arange(num_samples)
    stop = num_samples - num_samples % batch_size if drop_last else num_samples
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def _check_split(split):
    check_choice("dataset split", split, SPLITS, str(SPLITS))


def _require(path, what):
    if path is None or not os.path.exists(os.path.expanduser(str(path))):
        raise ConfigError(f"{what}: {path!r} does not exist (datasets are never downloaded; point it at local files)")
    return os.path.expanduser(str(path))


DIGITS_SAMPLES, DIGITS_CLASSES = 1797, 10


@register("dataset", limits={"test_size": Limit(DIGITS_CLASSES, DIGITS_SAMPLES - DIGITS_CLASSES,
                                                text=f"an integer in [{DIGITS_CLASSES}, "
                                                     f"{DIGITS_SAMPLES - DIGITS_CLASSES}] (each split needs every "
                                                     f"class of the {DIGITS_SAMPLES} digits)"),
                             "split_seed": Limit(0, 2**32 - 1)})
def Digits(split="train", test_size=450, split_seed=0):
    """sklearn's handwritten digits, 8x8 grey levels 0..16; stratified split with `split_seed`."""
    _check_split(split)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype("float32")[:, None]
    train_x, eval_x, train_y, eval_y = train_test_split(
        images, digits.target, test_size=test_size, stratify=digits.target, random_state=split_seed
    )
    x, y = (train_x, train_y) if split == "train" else (eval_x, eval_y)
    return ArrayDataset(x, y, 10, scale=16.0, mean=0.5, std=0.5)


@register("dataset", limits={"image_size": Limit(4, 4096)})
def ImageFolder(split="train", train_root=None, eval_root=None, image_size=32, grayscale=False):
    """Class-per-folder images: `<root>/<class name>/<image file>`; classes sorted by name.

    All images are decoded once into memory (meant for small, own datasets).
    """
    _check_split(split)
    root = _require(train_root if split == "train" else eval_root, f"ImageFolder.{split}_root")
    from PIL import Image

    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ConfigError(f"ImageFolder.{split}_root: {root!r} has no class sub-folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for file in sorted(os.listdir(folder)):
            if not file.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")):
                continue
            with Image.open(os.path.join(folder, file)) as img:
                img = img.convert("L" if grayscale else "RGB").resize((image_size, image_size))
                array = np.asarray(img, dtype="uint8")
            images.append(array[None] if grayscale else array.transpose(2, 0, 1))
            labels.append(label)
    if not images:
        raise ConfigError(f"ImageFolder.{split}_root: {root!r} holds no image files")
    return ArrayDataset(np.stack(images), labels, len(classes), 255.0, 0.5, 0.5, class_names=classes)


def _idx_dataset(cls_name, split, image_path, label_path, mean, std):
    import paddle.vision.datasets as vds

    image_path = _require(image_path, f"{cls_name}.{split}_images")
    label_path = _require(label_path, f"{cls_name}.{split}_labels")
    data = getattr(vds, cls_name)(image_path=image_path, label_path=label_path,
                                  mode="train" if split == "train" else "test", download=False)
    images = np.stack([np.asarray(img).reshape(1, 28, 28) for img in data.images]).astype("uint8")
    labels = np.concatenate([np.asarray(lbl).reshape(-1) for lbl in data.labels])
    return ArrayDataset(images, labels, 10, 255.0, mean, std)


@register("dataset")
def MNIST(split="train", train_images=None, train_labels=None, eval_images=None, eval_labels=None):
    """paddle.vision MNIST from local idx files (download=False)."""
    _check_split(split)
    paths = {"train": (train_images, train_labels), "eval": (eval_images, eval_labels)}[split]
    return _idx_dataset("MNIST", split, *paths, 0.1307, 0.3081)


@register("dataset")
def FashionMNIST(split="train", train_images=None, train_labels=None, eval_images=None, eval_labels=None):
    """paddle.vision FashionMNIST from local idx files (download=False)."""
    _check_split(split)
    paths = {"train": (train_images, train_labels), "eval": (eval_images, eval_labels)}[split]
    return _idx_dataset("FashionMNIST", split, *paths, 0.2860, 0.3530)


@register("dataset")
def Cifar10(split="train", data_file=None):
    """paddle.vision Cifar10 from the local `cifar-10-python.tar.gz` (download=False)."""
    _check_split(split)
    import paddle.vision.datasets as vds

    data_file = _require(data_file, "Cifar10.data_file")
    data = vds.Cifar10(data_file=data_file, mode="train" if split == "train" else "test", download=False)
    images = np.stack([np.asarray(img, dtype="uint8").reshape(3, 32, 32) for img, _ in data.data])
    labels = np.array([int(label) for _, label in data.data])
    return ArrayDataset(images, labels, 10, 255.0, 0.5, 0.25)
