"""The synthetic nonlinearity ladder (teacher–student classification)."""
import torch

from lcredit.data import Task
from lcredit.errors import check_range


def phi(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """phi_alpha(z) = (1 - alpha) z + alpha tanh(z): alpha=0 linear, alpha=1 tanh."""
    return (1 - alpha) * z + alpha * torch.tanh(z)


def ladder(d: int = 128, num_classes: int = 10, teacher_depth: int = 4, alpha: float = 1.0,
           teacher_gain: float = 1.0, n_train: int = 20000, n_test: int = 5000,
           seed: int = 0) -> Task:
    """Gaussian inputs through a fixed random teacher; the label is the argmax class score.

    The teacher has ``teacher_depth`` layers ``z <- phi_alpha(W z)`` with
    ``W ~ N(0, teacher_gain^2 / d)`` (a gain above 1 puts tanh in its nonlinear range), then a
    linear map to ``num_classes`` scores. Everything is drawn from ``seed`` alone, on the CPU,
    so the task and its fixed train/test split are identical on every machine and device.
    """
    check_range("data.d", d, 1, integer=True)
    check_range("data.num_classes", num_classes, 2, integer=True)
    check_range("data.teacher_depth", teacher_depth, 0, integer=True)
    check_range("data.alpha", alpha, 0.0, 1.0)
    check_range("data.n_train", n_train, 1, integer=True)
    check_range("data.n_test", n_test, 1, integer=True)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n_train + n_test, d, generator=g)
    z = x
    for _ in range(teacher_depth):
        w = torch.randn(d, d, generator=g) * (teacher_gain / d**0.5)
        z = phi(z @ w.T, alpha)
    w_out = torch.randn(num_classes, d, generator=g) / d**0.5
    y = (z @ w_out.T).argmax(1)
    return Task("ladder", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes)


def gaussian_images(shape=(3, 32, 32), num_classes: int = 10, n_train: int = 50000,
                    n_test: int = 10000, seed: int = 0) -> Task:
    """Image-shaped Gaussian inputs labelled by a fixed random linear teacher.

    A stand-in with CIFAR's shapes and sizes, for benchmarks and smoke tests where the real
    files are not at hand; it says nothing about CIFAR itself.
    """
    shape = tuple(int(s) for s in shape)
    check_range("data.num_classes", num_classes, 2, integer=True)
    check_range("data.n_train", n_train, 1, integer=True)
    check_range("data.n_test", n_test, 1, integer=True)
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(n_train + n_test, *shape, generator=g)
    w = torch.randn(num_classes, x[0].numel(), generator=g)
    y = (x.flatten(1) @ w.T).argmax(1)
    return Task("gaussian_images", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes)
