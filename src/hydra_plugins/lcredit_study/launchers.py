"""``hydra/launcher=joblib | slurm | slurm_local``: Hydra's own launcher plugins (joblib,
submitit), behind a thin shim that fails with the install command when the plugin is missing
(they are the optional extra ``pip install -e '.[cluster]'``), and that gives each local
parallel job its share of the cores (``LCREDIT_THREADS``, which train() applies)."""
import importlib
import os
from typing import Any, Sequence

from hydra.plugins.launcher import Launcher

INSTALL = "pip install -e '.[cluster]'"


def _plugin(choice: str, module: str, cls: str, package: str):
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise SystemExit(f"lcredit: error: hydra/launcher={choice} needs the {package} plugin, "
                         f"which is not installed: {INSTALL} (or pip install {package})") from None


class _Shim(Launcher):
    CHOICE = MODULE = CLASS = PACKAGE = ""

    def __init__(self, **params: Any) -> None:
        self.impl = _plugin(self.CHOICE, self.MODULE, self.CLASS, self.PACKAGE)(**params)
        self.params = params

    def setup(self, **kwargs: Any) -> None:
        self.impl.setup(**kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        return self.impl.launch(job_overrides, initial_job_idx)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class JoblibLauncher(_Shim):
    CHOICE, PACKAGE = "joblib", "hydra-joblib-launcher"
    MODULE, CLASS = "hydra_plugins.hydra_joblib_launcher.joblib_launcher", "JoblibLauncher"

    def launch(self, job_overrides, initial_job_idx):
        # jobs x threads <= cores: n parallel jobs each spinning every core would oversubscribe
        # them (the worker processes start now and inherit the environment)
        n = int(self.params.get("n_jobs") or -1)
        n = cores() if n < 1 else min(n, len(job_overrides))
        os.environ.setdefault("LCREDIT_THREADS", str(max(1, cores() // max(1, n))))
        return super().launch(job_overrides, initial_job_idx)


class SlurmLauncher(_Shim):
    CHOICE, PACKAGE = "slurm", "hydra-submitit-launcher"
    MODULE, CLASS = "hydra_plugins.hydra_submitit_launcher.submitit_launcher", "SlurmLauncher"


class SlurmLocalLauncher(_Shim):
    CHOICE, PACKAGE = "slurm_local", "hydra-submitit-launcher"
    MODULE, CLASS = "hydra_plugins.hydra_submitit_launcher.submitit_launcher", "LocalLauncher"
