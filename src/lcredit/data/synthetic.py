"""The synthetic nonlinearity ladder (teacher–student classification)."""
from typing import Annotated

import torch

from lcredit.data import Task
from lcredit.options import Count, Fraction, Index, NonNegative, Positive, Range, Seed, checked

Classes = Annotated[int, Range(2)]  # a classification task has at least two classes


def phi(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """phi_alpha(z) = (1 - alpha) z + alpha tanh(z): alpha=0 linear, alpha=1 tanh."""
    return (1 - alpha) * z + alpha * torch.tanh(z)


@checked("data")
def ladder(d: Count = 128, num_classes: Classes = 10, teacher_depth: Index = 4,
           alpha: Fraction = 1.0, teacher_gain: Positive = 1.0, n_train: Count = 20000,
           n_test: Count = 5000, seed: Seed = 0, fresh: bool = False,
           teacher_bias: NonNegative = 0.0) -> Task:
    """Gaussian inputs through a fixed random teacher; the label is the argmax class score.

    The teacher has ``teacher_depth`` layers ``z <- phi_alpha(W z)`` with
    ``W ~ N(0, teacher_gain^2 / d)`` (a gain above 1 puts tanh in its nonlinear range), then a
    linear map to ``num_classes`` scores. Everything is drawn from ``seed`` alone, on the CPU,
    so the task and its fixed train/test split are identical on every machine and device.
    ``fresh``: every epoch trains on ``n_train`` new samples from the teacher (a function of
    ``seed`` and the epoch), so a large learner cannot overfit a fixed set; the test set and
    the epoch-0 training set are the fixed ones.
    """
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n_train + n_test, d, generator=g)
    weights = [torch.randn(d, d, generator=g) * (teacher_gain / d**0.5)
               for _ in range(teacher_depth)]
    w_out = torch.randn(num_classes, d, generator=g) / d**0.5
    # Drawn last, so a teacher without biases is the same draw as before they existed.
    biases = [torch.randn(d, generator=g) * teacher_bias if teacher_bias else 0.0
              for _ in range(teacher_depth)]

    def label(inputs):
        z = inputs
        for w, b in zip(weights, biases):
            z = phi(z @ w.T + b, alpha)
        return (z @ w_out.T).argmax(1)

    def resample(epoch: int):
        if epoch == 0:
            return x[:n_train], y[:n_train]
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + 7_919 * int(epoch)) % 2**63)
        fresh_x = torch.randn(n_train, d, generator=gen)
        return fresh_x, label(fresh_x)

    y = label(x)
    return Task("ladder", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes,
                resample=resample if fresh else None)


@checked("data")
def gaussian_images(shape: tuple[Count, ...] = (3, 32, 32), num_classes: Classes = 10,
                    n_train: Count = 50000, n_test: Count = 10000, seed: Seed = 0) -> Task:
    """Image-shaped Gaussian inputs labelled by a fixed random linear teacher.

    A stand-in with CIFAR's shapes and sizes, for benchmarks and smoke tests where the real
    files are not at hand; it says nothing about CIFAR itself.
    """
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n_train + n_test, *shape, generator=g)
    w = torch.randn(num_classes, x[0].numel(), generator=g)
    y = (x.flatten(1) @ w.T).argmax(1)
    return Task("gaussian_images", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes)
