"""Data modules: shapes, seeded splits, and torchvision's readers on files in the real formats."""

from __future__ import annotations

import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_spectral.demos import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    CIFAR10DataModule,
    DigitsDataModule,
    MNISTDataModule,
)


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_range_and_split_sizes() -> None:
    dm = DigitsDataModule(batch_size=100, val_fraction=0.2, test_fraction=0.1, seed=3)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (100, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.long
    n_train, n_val, n_test = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert n_train + n_val + n_test == 1797
    assert n_val == round(0.2 * 1797) and n_test == round(0.1 * 1797)
    xs, ys = _all(dm.val_dataloader())
    assert xs.min() >= 0.0 and xs.max() <= 1.0 and xs.max() == 1.0
    assert set(ys.tolist()) == set(range(10))


def test_digits_splits_are_disjoint_and_match_sklearn() -> None:
    dm = DigitsDataModule(seed=1)
    dm.setup()
    idx = [set(s.indices) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert not (idx[0] & idx[1]) and not (idx[0] & idx[2]) and not (idx[1] & idx[2])
    assert set().union(*idx) == set(range(1797))
    # Every stored image is sklearn's 0..16 image divided by 16, with its own label.
    digits = load_digits()
    for i in list(dm.val_set.indices)[:50]:
        x, y = dm.val_set.dataset[i]
        np.testing.assert_allclose(x[0].numpy(), digits.images[i] / 16.0, rtol=0, atol=1e-7)
        assert y.item() == digits.target[i]


def test_digits_determinism() -> None:
    def run(seed: int) -> tuple[list[int], torch.Tensor]:
        dm = DigitsDataModule(batch_size=32, seed=seed)
        dm.setup()
        return list(dm.test_set.indices), next(iter(dm.train_dataloader()))[1]

    a, b, c = run(0), run(0), run(1)
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert a[0] != c[0]
    # The shuffling generator is private: the global RNG does not change the batch order.
    torch.manual_seed(12345)
    assert torch.equal(run(0)[1], a[1])
    # Evaluation loaders keep the order; the training loader reshuffles every epoch.
    dm = DigitsDataModule(batch_size=2000, seed=0)
    loader = dm.train_dataloader()
    first, second = _all(loader)[1], _all(loader)[1]
    assert not torch.equal(first, second)
    assert torch.equal(first.sort().values, second.sort().values)
    assert torch.equal(_all(dm.test_dataloader())[1], _all(dm.test_dataloader())[1])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"num_workers": -1},
        {"val_fraction": 0.0},
        {"test_fraction": 1.0},
        {"val_fraction": 0.5, "test_fraction": 0.5},
    ],
)
def test_digits_rejects_bad_arguments(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)


# --------------------------------------------------------------------------- optional deps

EXTRA_HINT = r'pip install "lightning-spectral\[examples\]"'


def _uninstall(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``import <module>`` raise ImportError: ``None`` in ``sys.modules`` is the import
    system's own marker for a module that cannot be imported (restored after the test)."""
    for name in [m for m in sys.modules if m.split(".")[0] in modules]:
        monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_digits_without_sklearn_fails_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    _uninstall(monkeypatch, "sklearn")
    with pytest.raises(ImportError, match=f"DigitsDataModule needs scikit-learn.*{EXTRA_HINT}"):
        DigitsDataModule()


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule])
def test_torchvision_datasets_without_torchvision_fail_at_construction(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cls: type
) -> None:
    _uninstall(monkeypatch, "torchvision")
    with pytest.raises(ImportError, match=f"{cls.__name__} needs torchvision.*{EXTRA_HINT}"):
        cls(tmp_path)


# --------------------------------------------------------------------------- MNIST


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of LeCun's MNIST files: magic (0, 0, type 0x08 = ubyte, ndim), big-endian
    int32 dimensions, then the raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _fake_mnist(root: Path, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return arrays


def test_mnist_reads_idx_files(tmp_path: Path) -> None:
    arrays = _fake_mnist(tmp_path, n_train=40, n_test=15)
    dm = MNISTDataModule(tmp_path, batch_size=8, val_size=10, seed=0)
    dm.prepare_data()  # download=False: nothing happens
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 15)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    # The test set comes back in file order, normalized with MNIST's statistics.
    xs, ys = _all(dm.test_dataloader())
    images, labels = arrays["t10k"]
    expected = (images / 255.0 - MNIST_MEAN[0]) / MNIST_STD[0]
    np.testing.assert_allclose(xs[:, 0].numpy(), expected, atol=1e-5)
    assert ys.tolist() == labels.tolist()
    # Validation images are training images, held out by the seeded split.
    xv, yv = _all(dm.val_dataloader())
    train_images = arrays["train"][0]
    for img, i in zip(xv, dm.val_set.indices, strict=True):
        np.testing.assert_allclose(
            img[0].numpy(), (train_images[i] / 255.0 - MNIST_MEAN[0]) / MNIST_STD[0], atol=1e-5
        )
    assert dm.input_scale == pytest.approx(MNIST_STD[0])
    raw_dm = MNISTDataModule(tmp_path, batch_size=8, val_size=10, normalize=False)
    assert raw_dm.input_scale == 1.0
    raw_dm.setup("test")
    np.testing.assert_allclose(
        _all(raw_dm.test_dataloader())[0][:, 0].numpy(), images / 255.0, atol=1e-6
    )


def test_mnist_missing_files_raise_without_downloading(tmp_path: Path) -> None:
    dm = MNISTDataModule(tmp_path / "nowhere", batch_size=8)
    dm.prepare_data()
    with pytest.raises(RuntimeError, match="download=True"):
        dm.setup("fit")
    assert not (tmp_path / "nowhere").exists()


def test_mnist_val_size_must_leave_training_data(tmp_path: Path) -> None:
    _fake_mnist(tmp_path, n_train=10, n_test=5)
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule(tmp_path, val_size=10).setup("fit")


# --------------------------------------------------------------------------- CIFAR-10


def _fake_cifar10(root: Path, per_batch: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The python pickles of cifar-10-batches-py: dicts with 'data' (n x 3072 uint8, channel-major
    rows) and 'labels', plus batches.meta with 'label_names'."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        batches[name] = (data, labels)
    names = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, f)
    return batches


def test_cifar10_reads_pickled_batches(tmp_path: Path) -> None:
    batches = _fake_cifar10(tmp_path, per_batch=6)
    dm = CIFAR10DataModule(
        tmp_path, batch_size=4, val_size=5, augment=False, verify_checksums=False
    )
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (25, 5, 6)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    xs, ys = _all(dm.test_dataloader())
    data, labels = batches["test_batch"]
    mean = np.asarray(CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR10_STD).reshape(1, 3, 1, 1)
    expected = (data.reshape(-1, 3, 32, 32) / 255.0 - mean) / std
    np.testing.assert_allclose(xs.numpy(), expected, atol=1e-5)
    assert ys.tolist() == labels
    assert dm.test_set.classes[9] == "truck"
    assert dm.input_scale == pytest.approx(min(CIFAR10_STD))


def test_cifar10_augmentation_only_on_training_images(tmp_path: Path) -> None:
    batches = _fake_cifar10(tmp_path, per_batch=4)
    dm = CIFAR10DataModule(
        tmp_path, batch_size=20, val_size=4, verify_checksums=False, normalize=False
    )
    dm.setup("fit")
    train_images = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_images = train_images.reshape(-1, 3, 32, 32) / 255.0
    xv, _ = _all(dm.val_dataloader())
    np.testing.assert_allclose(xv.numpy(), train_images[dm.val_set.indices], atol=1e-6)
    torch.manual_seed(0)
    xt, _ = _all(dm.train_dataloader())
    # Random crops shift the image, so some augmented image differs from its source.
    assert not np.allclose(xt.numpy(), train_images[dm.train_set.indices], atol=1e-6)


def test_cifar10_checksums_are_verified_by_default(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path, per_batch=2)
    # Our files are not the real CIFAR-10, so torchvision's md5 check rejects them.
    with pytest.raises(RuntimeError, match="corrupted"):
        CIFAR10DataModule(tmp_path).setup("fit")
    with pytest.raises(ValueError, match="verify_checksums"):
        CIFAR10DataModule(tmp_path, download=True, verify_checksums=False)


def test_digits_accepts_numpy_integers_as_python_ints() -> None:
    """Sizes read from numpy (a config array, ``np.arange``) are integers like any other."""
    dm = DigitsDataModule(batch_size=np.int64(16), num_workers=np.int32(0))
    assert type(dm.batch_size) is int and dm.batch_size == 16
    assert type(dm.num_workers) is int and dm.num_workers == 0
