"""No host synchronisation on the step path (issue 13): inside every rule's training_step, no
tensor is turned into a Python number or bool (``.item()``, ``int()``, ``float()``, ``bool()``,
``.tolist()``, an ``if`` on a tensor). On a GPU each of those waits for the device to finish; a
step must only queue work. Checked here on the CPU by making those conversions raise."""
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import TINY_LADDER, TINY_MEASURE, compose_cfg
from lcredit.train import train

CONVERSIONS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
# torch.optim keeps its step counters on the host by design (a CPU tensor even on CUDA):
# converting those is no device sync.
ALLOWED = ("torch.optim",)


class HostSync(AssertionError):
    pass


class NoHostSync(Callback):
    """Wraps the rule's training_step: while it runs, converting a tensor raises HostSync."""

    def __init__(self):
        self.steps = 0

    def setup(self, trainer, pl_module, stage):
        step, cb = pl_module.training_step, self

        def guarded(*args, **kwargs):
            originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

            def refuse(name):
                def conversion(t, *a, **k):
                    caller = sys._getframe(1).f_globals.get("__name__", "")
                    if not caller.startswith(ALLOWED):
                        raise HostSync(f"Tensor.{name} in a training step (from {caller})")
                    return originals[name](t, *a, **k)
                return conversion

            try:
                for name in CONVERSIONS:
                    setattr(torch.Tensor, name, refuse(name))
                out = step(*args, **kwargs)
            finally:
                for name, fn in originals.items():
                    setattr(torch.Tensor, name, fn)
            cb.steps += 1
            return out

        pl_module.training_step = guarded


def test_the_guard_catches_a_conversion(tmp_path):
    """The control: a step that reads a tensor on the host is caught."""
    class Reads(NoHostSync):
        def setup(self, trainer, pl_module, stage):
            original = pl_module.compute_gradients

            def compute(x, y):
                loss, logits = original(x, y)
                if loss > 0:  # a data-dependent Python branch
                    pass
                return loss, logits
            pl_module.compute_gradients = compute
            super().setup(trainer, pl_module, stage)

    with pytest.raises(HostSync, match="__bool__"):
        train(compose_cfg(tmp_path / "run", "method=bp", *TINY_LADDER, *TINY_MEASURE,
                          "data.n_train=128", "trainer.max_epochs=1"), extra_callbacks=[Reads()])


# ep with tol > 0 (its default) stops a relaxation once it has converged: a data-dependent
# branch, one host read per iteration. tol = 0 runs its T iterations without one.
EP_STOPS = pytest.param("ep", marks=pytest.mark.xfail(
    strict=True, raises=HostSync, reason="ep's tol > 0 early stop reads the residual each iteration"))
RULES = ["bp", "dfa", "fa", "fa+method.variant=layerwise", "frozen", EP_STOPS, "ep+method.tol=0",
         "sb", "cb", "vec", "blend", "vec_gated", "cb_relative", "blend_gated",
         "usf", "brsf", "frsf", "kp", "drtp"]


@pytest.mark.parametrize("rule", RULES)
def test_no_host_sync_in_any_rules_training_step(tmp_path, rule):
    method, *extra = rule.split("+")
    guard = NoHostSync()
    # 2 epochs: the estimators' warm-up epoch and the rule's own phase both take steps
    r = train(compose_cfg(tmp_path / "run", f"method={method}", *extra, *TINY_LADDER,
                          *TINY_MEASURE, "data.n_train=256", "trainer.max_epochs=2",
                          "method.warmup_ratio=0.5" if method in ("sb", "cb", "vec") else "seed=0",
                          "data.batch_size=128", "trainer.log_every_n_steps=1"),
              extra_callbacks=[guard])
    assert r["status"] == "completed", r.get("error")
    assert guard.steps == r["final"]["epochs"] * 2  # every step ran guarded
