"""CUDA paths: every rule (and preset) trains on a GPU, in fp32 and bf16-mixed, and its
measurement is the CPU's. Skipped where no GPU is present (CI); run on a lent GPU machine
(scripts/gpu_check.sh)."""
from pathlib import Path

import pytest
import torch

from conftest import TINY_LADDER
from lcredit.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
METHODS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf/method").glob("*.yaml"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_every_rule_trains_on_cuda(make_cfg, method, precision):
    r = train(make_cfg(f"method={method}", *TINY_LADDER, "trainer=gpu",
                       f"trainer.precision={precision}", "trainer.max_epochs=2",
                       "data.n_train=512"))
    assert r["status"] == "completed", r.get("abort")
    assert all(row["train_loss"] == row["train_loss"] for row in r["history"])  # no NaN
    assert r["protocol"]["aggregates"]["gamma_hidden"] is not None


@pytest.mark.parametrize("method", ["dfa", "fa", "ep", "vec"])
def test_a_cuda_run_audited_on_the_cpu_gives_the_same_report(make_cfg, method):
    """The measurement runs in float64 whatever the device: the in-run report of a GPU run and
    a CPU audit of its checkpoint agree."""
    from lcredit.audit import audit
    r = train(make_cfg(f"method={method}", *TINY_LADDER, "trainer=gpu", "trainer.max_epochs=1",
                       "data.n_train=512"))
    rep = audit(r["checkpoint"])
    for key in ("gamma_hidden", "gamma_0", "gamma_deep", "rho_deep"):
        assert rep.aggregates[key] == pytest.approx(r["protocol"]["aggregates"][key], abs=1e-6), key
    assert rep.diagnostics["a"]["value"] == pytest.approx(r["protocol"]["diagnostics"]["a"]["value"],
                                                          rel=1e-6)
