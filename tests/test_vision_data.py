"""torchvision tasks read from small files written in the genuine on-disk formats."""
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from lcredit.data import DeviceBatches
from lcredit.data.vision import torchvision_task
from lcredit.errors import ConfigError
from lcredit.train import train

N = 10  # samples per CIFAR batch file


def _pickle(path: Path, obj) -> None:
    # The genuine files are Python-2 pickles with str keys; torchvision reads them with
    # pickle.load(f, encoding="latin1").
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _images(rng, n):
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, rng):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    written = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = _images(rng, N), rng.integers(0, 10, size=N).tolist()
        _pickle(d / name, {"data": x, "labels": y, "batch_label": name})
        split = "test" if name == "test_batch" else "train"
        written[split][0].append(x)
        written[split][1].extend(y)
    _pickle(d / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return {k: (np.concatenate(v[0]), v[1]) for k, v in written.items()}


def write_cifar100(root: Path, rng):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    written = {}
    for split, n in (("train", 3 * N), ("test", N)):
        x, y = _images(rng, n), rng.integers(0, 100, size=n).tolist()
        _pickle(d / split, {"data": x, "fine_labels": y, "coarse_labels": [0] * n})
        written[split] = (x, y)
    _pickle(d / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                         "coarse_label_names": [f"k{i}" for i in range(20)]})
    return written


def _idx(path: Path, array: np.ndarray) -> None:
    # idx format: 0x0000, type 0x08 (uint8), ndim, big-endian dims, then the raw bytes.
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, rng):
    d = root / "FashionMNIST" / "raw"
    d.mkdir(parents=True)
    written = {}
    for split, prefix, n in (("train", "train", 3 * N), ("test", "t10k", N)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        _idx(d / f"{prefix}-images-idx3-ubyte", x)
        _idx(d / f"{prefix}-labels-idx1-ubyte", y)
        written[split] = (x, y.tolist())
    return written


WRITERS = {"cifar10": (write_cifar10, (3, 32, 32), 10),
           "cifar100": (write_cifar100, (3, 32, 32), 100),
           "fashion_mnist": (write_fashion_mnist, (1, 28, 28), 10)}


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """A data root holding all three sets; the CIFAR md5 check passes for these files only."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    written = {name: w(root, rng) for name, (w, _, _) in WRITERS.items()}
    return root, written


@pytest.mark.parametrize("name", list(WRITERS))
def test_torchvision_sets_load_from_genuine_files(fake_root, name):
    root, written = fake_root
    task = torchvision_task(name, root=str(root), download=False)
    _, shape, classes = WRITERS[name]
    assert task.num_classes == classes and task.input_shape == shape
    assert task.x_train.dtype == torch.float32
    for split, x_t, y_t in (("train", task.x_train, task.y_train), ("test", task.x_test, task.y_test)):
        raw, labels = written[name][split]
        assert y_t.tolist() == list(labels)
        assert len(x_t) == len(labels)
    # Normalised per channel on the training split.
    flat = task.x_train.transpose(0, 1).flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(shape[0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1), torch.ones(shape[0]), atol=1e-4, rtol=0)
    # Pixels land where they were written: undo the normalisation on one test image.
    raw_test = written[name]["test"][0]
    img = raw_test[3].reshape(shape) if name != "fashion_mnist" else raw_test[3][None]
    raw_train = written[name]["train"][0].reshape(-1, *shape).astype(np.float64) / 255
    mean = raw_train.mean(axis=(0, 2, 3))
    std = raw_train.std(axis=(0, 2, 3), ddof=1)
    recovered = task.x_test[3].double().numpy() * std[:, None, None] + mean[:, None, None]
    np.testing.assert_allclose(recovered * 255, img.astype(np.float64), atol=1e-3)


@pytest.mark.parametrize("name", list(WRITERS))
def test_random_targets_on_torchvision_sets(fake_root, name):
    root, _ = fake_root
    task = torchvision_task(name, root=str(root))
    fake = torch.cat([y for _, y in DeviceBatches(task.x_train, task.y_train, 8, shuffle=True,
                                                   random_targets=True,
                                                   num_classes=task.num_classes)])
    assert fake.shape == task.y_train.shape and 0 <= fake.min() and fake.max() < task.num_classes
    assert not torch.equal(fake, task.y_train)


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"),
                                         ("cifar100", "cifar-100-python"),
                                         ("fashion_mnist", "FashionMNIST")])
def test_missing_data_names_the_path_and_the_option(tmp_path, name, folder):
    with pytest.raises(ConfigError) as err:
        torchvision_task(name, root=str(tmp_path / "empty"), download=False)
    msg = str(err.value)
    assert str(tmp_path / "empty" / folder) in msg and "data.download=true" in msg


def test_missing_data_fails_before_training(tmp_path):
    cfg = compose_cfg(tmp_path / "run", "data=cifar10", f"data.root={tmp_path}/nothing")
    with pytest.raises(ConfigError, match="data.download"):
        train(cfg)
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("model", ["resmlp", "small_cnn"])
def test_training_on_fake_cifar10(fake_root, tmp_path, model):
    root, _ = fake_root
    cfg = compose_cfg(tmp_path / "run", "data=cifar10", f"data.root={root}", "method=bp",
                      f"model={model}", "trainer.max_epochs=1", "data.batch_size=16")
    results = train(cfg)
    assert results["status"] == "completed" and 0 <= results["final"]["test_acc"] <= 1
    assert results["task"] == "cifar10"
