"""Building a run's parts from its config: the one place that instantiates a model, a rule, an
optimiser and a task's fit to the model. train, audit, probe, exploit and the study's
calibration build through here (none of them imports another's entry point)."""
from __future__ import annotations

from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from lcredit.config import OptimLimits, RunOptions
from lcredit.data import fit_to_model
from lcredit.errors import ConfigError
from lcredit.options import check_options

# The config groups ship inside the package (conf/ at the repository root links here), so an
# installed lcredit (pip install .) finds them as well as a checkout does.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def instantiate_group(group: str, node: DictConfig, **extra):
    """Instantiate ``node`` after checking its keys against the target's signature."""
    if "_target_" not in node:
        raise ConfigError(f"{group}: no _target_ (choose one with {group}=<name>)")
    target = get_class(node._target_)
    opts = {k: v for k, v in node.items() if not str(k).startswith("_")}
    check_options(target.__init__, opts, group)
    try:
        return instantiate(node, **extra, _convert_="all")
    except InstantiationException as err:
        # Hydra wraps a constructor's error; a ConfigError underneath is the message to show.
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise


def fit_task(cfg: DictConfig, task):
    """The task as the configured model takes it (image models get (C, S, S) images)."""
    if "_target_" not in cfg.model:
        raise ConfigError("model: no _target_ (choose one with model=<name>)")
    return fit_to_model(task, get_class(cfg.model._target_), cfg.model)


def build_rule(cfg: DictConfig, task):
    """Model and rule for ``task`` (already fitted to the model by ``fit_task``)."""
    model = instantiate_group("model", cfg.model, input_shape=task.input_shape,
                               num_classes=task.num_classes)
    if task.check_model is not None:
        task.check_model(model)
    optimizer = None
    if cfg.get("optim"):
        if "_target_" not in cfg.optim:
            raise ConfigError("optim: no _target_ (choose one with optim=<name>)")
        opts = {k: v for k, v in cfg.optim.items() if not str(k).startswith("_")}
        check_options(get_class(cfg.optim._target_).__init__, opts, "optim", also=OptimLimits)
        optimizer = instantiate(cfg.optim)
    rule = instantiate_group("method", cfg.method, model=model, input_shape=task.input_shape,
                              num_classes=task.num_classes, optimizer=optimizer)
    rule.loss_kind, rule.costate = task.loss, task.costate
    fixed = cfg.get("fixed_network", False)
    if fixed not in (True, False):
        raise ConfigError(f"fixed_network={fixed!r} must be true or false")
    rule.fixed_network = bool(fixed)
    check_options(RunOptions, {k: cfg[k] for k in ("lr_schedule", "block_grad_clip") if k in cfg})
    rule.lr_schedule = cfg.get("lr_schedule", "constant")
    clip = cfg.get("block_grad_clip")
    if clip is not None:
        rule.block_grad_clip = float(clip)
    return rule
