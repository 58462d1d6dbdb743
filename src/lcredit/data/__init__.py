"""Tasks as whole tensors on the training device, batched by on-device random permutations.

Datasets here are small enough to live on the device in full, which removes the DataLoader
(and its ~1 ms/step of worker and collation overhead) from the training loop.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import TypedDict

import torch
import torch.nn.functional as F
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from lcredit.errors import ConfigError
from lcredit.options import Count, check_options


class Batching(TypedDict, total=False):
    """The keys of a data config that describe batching, not the task itself."""
    batch_size: Count
    eval_batch_size: Count
    random_targets: bool  # train on random labels (the memorisation control)


BATCHING_KEYS = tuple(Batching.__annotations__)


@dataclass
class Task:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int       # classes, or output dimension for a regression task
    loss: str = "ce"       # "ce": cross-entropy on labels; "mse": 1/2 ||output - y||^2
    costate: object = None  # fn(model, x, y) -> exact adjoint [p_0..p_L], if the task knows it
    check_model: object = None  # fn(model): raises ConfigError for a model the task cannot use
    notes: tuple = ()
    # fn(epoch) -> (x, y) on the CPU: a fresh training set for that epoch (a generative task
    # drawing new samples every epoch); None: x_train / y_train every epoch.
    resample: object = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "Task":
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in
                                            ("x_train", "y_train", "x_test", "y_test")})


class EpochSampler:
    """Holds the epoch number; Lightning calls ``set_epoch`` on a loader's ``sampler`` before
    every epoch (the restored one after a resume), so each epoch's permutation is a pure function
    of (seed, epoch) and a resumed run sees exactly the batches an uninterrupted one would."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class DeviceBatches:
    """Iterable of ``(x, y)`` minibatches drawn from device tensors.

    ``shuffle``: a fresh on-device permutation per epoch. ``random_targets``: every minibatch
    gets i.i.d. uniform labels in ``[0, num_classes)`` (the negative control of docs/models_and_tasks.md), drawn
    from the same per-epoch generator so they are reproducible too.
    """

    def __init__(self, x, y, batch_size: int, *, shuffle: bool, seed: int = 0,
                 random_targets: bool = False, num_classes: int | None = None, resample=None):
        self.x, self.y = x, y
        self.resample = resample
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.random_targets = random_targets
        self.num_classes = num_classes
        self.sampler = EpochSampler()
        self.batch_sampler = None  # Lightning inspects it; batching is done here instead

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def _generator(self) -> torch.Generator:
        g = torch.Generator(device=self.x.device)
        g.manual_seed((self.seed * 1_000_003 + self.sampler.epoch) % (2**63))
        return g

    def __iter__(self):
        x, y = self.x, self.y
        if self.resample is not None:  # this epoch's fresh samples (a function of the epoch)
            x, y = (t.to(self.x.device) for t in self.resample(self.sampler.epoch))
        n, bs = len(x), self.batch_size
        g = self._generator()
        order = torch.randperm(n, generator=g, device=x.device) if self.shuffle else None
        for start in range(0, n, bs):
            if order is None:
                xb, yb = x[start:start + bs], y[start:start + bs]
            else:
                idx = order[start:start + bs]
                xb, yb = x[idx], y[idx]
            if self.random_targets:
                if yb.is_floating_point():  # regression: i.i.d. standard normal targets
                    yb = torch.randn(yb.shape, generator=g, device=yb.device, dtype=yb.dtype)
                else:
                    yb = torch.randint(self.num_classes, yb.shape, generator=g, device=yb.device)
            yield xb, yb


def build_task(data_cfg: DictConfig) -> Task:
    """Instantiate the task function named by ``data._target_`` with the task's own keys."""
    cfg = OmegaConf.to_container(data_cfg, resolve=True)
    target = cfg.pop("_target_", None)
    if target is None:
        raise ConfigError("data: the data config has no _target_ (pick one with data=<name>)")
    for k in BATCHING_KEYS:
        cfg.pop(k, None)
    fn = get_method(target)
    check_options(fn, cfg, "data")  # also for a task function of the user's, not `checked`
    return fn(**cfg)


def batching(data_cfg: DictConfig) -> dict:
    opts = {k: data_cfg[k] for k in BATCHING_KEYS if k in data_cfg}
    check_options(Batching, opts, "data")
    return {"batch_size": int(opts.get("batch_size", 128)),
            "eval_batch_size": int(opts.get("eval_batch_size", 1000)),
            "random_targets": opts.get("random_targets", False)}


def fit_to_model(task: Task, model_cls, model_opts: dict, model_key: str = "model") -> Task:
    """Give an image model its input shape: (C, S, S) with S = ``model.image_size``.

    Images up to 4 pixels smaller are zero-padded (FashionMNIST 28 -> 32), others resized
    bilinearly (digits 8 -> 32). A model that needs images and gets vectors fails here, at
    config time, saying what would work.
    """
    if not getattr(model_cls, "image_input", False):
        return task
    name = model_cls.__name__
    if len(task.input_shape) != 3:
        raise ConfigError(
            f"{model_key}={name} needs image input (channels, height, width), but "
            f"data={task.name} gives vectors of shape {task.input_shape}. Use an image task "
            f"(digits, cifar10, cifar100, fashion_mnist, gaussian_images) or a vector model "
            f"(resmlp, student).")
    size = model_opts.get("image_size", 32)
    check_options(model_cls.__init__, {"image_size": size}, model_key)
    size = int(size)
    _, h, w = task.input_shape
    if (h, w) == (size, size):
        return task

    def fit(x):
        if h <= size and w <= size and size - h <= 4 and size - w <= 4:
            top, left = (size - h) // 2, (size - w) // 2
            return F.pad(x, (left, size - w - left, top, size - h - top))
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    note = (f"inputs {h}x{w} -> {size}x{size} for {name} "
            f"({'zero-padded' if size - h <= 4 and h <= size else 'bilinear resize'})")
    return dataclasses.replace(task, x_train=fit(task.x_train), x_test=fit(task.x_test),
                               notes=task.notes + (note,))
