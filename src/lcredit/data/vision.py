"""CIFAR-10/100 and FashionMNIST through torchvision, normalised per channel on train stats."""
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lcredit.data import Task
from lcredit.errors import ConfigError
from lcredit.options import checked

# name -> (torchvision class name, folder torchvision expects under root, classes)
DATASETS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10),
    "cifar100": ("CIFAR100", "cifar-100-python", 100),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST", 10),
}


def _load_split(name: str, root: Path, train: bool, download: bool):
    import torchvision.datasets as tvd

    cls_name, folder, _ = DATASETS[name]
    try:
        ds = getattr(tvd, cls_name)(str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted ..."
        hint = ("set data.download=true where a network is available"
                if not download else "check the network or place the files there by hand")
        raise ConfigError(
            f"data={name}: no usable dataset at {root / folder} ({err}). Point data.root at the "
            f"directory that contains '{folder}', or {hint}."
        ) from None
    except OSError as err:  # a download attempted without a network
        raise ConfigError(
            f"data={name}: could not download into {root} ({err}). Place the files under "
            f"{root / folder} by hand and keep data.download=false."
        ) from None
    except Exception as err:  # noqa: BLE001 — corrupt files: torchvision asserts, numpy, pickle
        raise ConfigError(
            f"data={name}: the files under {root / folder} are corrupt or not in {cls_name}'s "
            f"format ({type(err).__name__}: {str(err)[:120] or 'no message'}); replace them "
            f"(or delete them and set data.download=true where a network is available)."
        ) from None
    x = ds.data
    x = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # -> (N, C, H, W)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)
    return x.float().div_(255.0), y


@checked("data")
def torchvision_task(name: Literal[tuple(DATASETS)], root: str = "data",
                     download: bool = False) -> Task:
    root_path = Path(root).expanduser().resolve()
    x_train, y_train = _load_split(name, root_path, True, download)
    x_test, y_test = _load_split(name, root_path, False, download)
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std
    return Task(name, x_train, y_train, x_test, y_test, DATASETS[name][2])
