import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from lcredit.cli import register_resolvers
from lcredit.models import ResMLP
from lcredit.rules import Rule

register_resolvers()  # as every entry point does before Hydra reads a config
CONF = str(Path(__file__).resolve().parents[1] / "conf")
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "protocol.print_report=false",
         "protocol.frozen_baseline=null"]
# docs/metrics.md's rho (1024 samples x 32 directions) and 20 null draws cost minutes per measurement on
# the image models in float64 on a 2-core CPU; runs in tests measure at smaller sizes, and the
# tests of the measurement itself (test_diagnostics) and of the defaults use docs/metrics.md's.
LIGHT_MEASURE = ["protocol.measure.rho_samples=256", "protocol.measure.rho_directions=8",
                 "protocol.measure.null_draws=4"]
# For tests of plumbing around a run (resume, branching), not of the numbers measured.
TINY_MEASURE = ["protocol.measure.rho_samples=32", "protocol.measure.rho_directions=2",
                "protocol.measure.null_draws=2", "protocol.stability_batches=2",
                "protocol.eval_batches=1", "protocol.batch_size=32"]
TINY_LADDER = ["data.n_train=1024", "data.n_test=512", "model.d=32", "model.depth=2"]


# The small float64 network and batch the rule-level tests (estimators, sign symmetry, KP, DRTP)
# build their identities on.
SMALL_SHAPE, SMALL_C = (12,), 5


def small_resmlp(seed=0, **kw):
    torch.manual_seed(seed)
    return ResMLP(SMALL_SHAPE, SMALL_C, **(dict(d=16, depth=3, mlp_ratio=2.0) | kw)).double()


def small_batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *SMALL_SHAPE, generator=g, dtype=torch.float64),
            torch.randint(SMALL_C, (n,), generator=g))


def pytest_configure(config):
    """Under pytest-xdist each worker gets its share of the cores (for its own torch ops and the
    CLI subprocesses it starts): n workers each spinning all cores would oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        share = max(1, (cores or 1) // workers)
        torch.set_num_threads(share)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(share)


def compose_cfg(out_dir, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("config", overrides=[f"paths.output_dir={out_dir}",
                                            f"paths.cache_dir={Path(out_dir).parent / 'cache'}",
                                            *QUIET, *LIGHT_MEASURE, *overrides])


@pytest.fixture
def one_thread():
    """For modules of many tiny ops (relaxations, estimator nets): one thread is faster there,
    and on a loaded 2-core machine two threads spinning on every small op are many times
    slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides, out="run"):
        return compose_cfg(tmp_path / out, *overrides)
    return make


def assert_resume_exact(make_cfg, *common):
    """A run stopped after 2 epochs and resumed to 3 ends exactly where an uninterrupted
    3-epoch run does: metrics, history and every tensor in the checkpoint (bitwise on CPU)."""
    import torch

    from lcredit.train import train

    full = train(make_cfg(*common, "trainer.max_epochs=3", out="full"))
    part = train(make_cfg(*common, "trainer.max_epochs=2", out="part"))
    resumed = train(make_cfg(*common, "trainer.max_epochs=3", f"resume={part['checkpoint']}",
                             out="resumed"))
    assert resumed["final"] == full["final"]
    assert [r["test_acc"] for r in resumed["history"]] == [r["test_acc"] for r in full["history"]]
    a, b = (torch.load(r["checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
            for r in (full, resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class GivenCredit(Rule):
    """A local rule whose credit is handed in (``credits=[a_0..a_L]``): with backprop's own
    gradient it is the oracle the shared update must turn into backprop's update."""

    def __init__(self, *a, credits=None, **kw):
        super().__init__(*a, **kw)
        self.given = credits

    def top_credit(self, p):
        return self.given[-1]

    def layer_credit(self, l, p, vjp):
        return self.given[l]


def forked_cli(module, *args, cwd, env=None, timeout=300):
    """``python -m <module> <args>`` run in a fork of this test process: the same entry point
    (``runpy`` as ``__main__``, fresh sys.argv, cwd and environment, its own stdout/stderr and
    exit code), without paying the interpreter's start and the torch + Lightning import again
    (~16 CPU-s a start on this machine). Returns a CompletedProcess. For tests of what the
    command does; a test of the installed interpreter's view (a wheel) starts a real one."""
    import runpy
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import warnings

    out, err = (tempfile.TemporaryFile(mode="w+") for _ in range(2))
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
            sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.chdir(cwd)
            if env is not None:  # the child's whole environment, as subprocess's env= is
                os.environ.clear()
                os.environ.update(env)
            warnings.simplefilter("ignore")  # as PYTHONWARNINGS=ignore did for the subprocesses
            GlobalHydra.instance().clear()
            sys.argv = [module, *map(str, args)]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 — what an uncaught error does to a real process
            import traceback
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001
                    pass
            os._exit(code & 0xFF if code >= 0 else 256 + code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise subprocess.TimeoutExpired([module, *args], timeout)
        time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess([module, *args], code, out.read(), err.read())
