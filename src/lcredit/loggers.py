"""Lightning's CSV logger, except that a resumed run continues the metrics.csv of the run it
resumes (Lightning's writer deletes a metrics.csv it finds, losing the first segment), without
the rows of the partial epoch the checkpoint does not cover (they are logged again); a run's
loggers from its config, its W&B run's name, group and summary; Lightning's own messages a user
cannot act on, silenced."""
import csv
import io
import logging
import warnings
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import CSVLogger as _CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import OmegaConf

from lcredit.cli import job_dirname
from lcredit.files import atomic_write


def _covered(row: dict, step: int, epochs_done: int) -> bool:
    """A row the checkpoint (at ``step``, after ``epochs_done`` epochs) accounts for."""
    try:
        s = int(float(row.get("step") or 0))
    except ValueError:
        return True
    if s != step:
        return s < step
    epoch = row.get("epoch")
    return not epoch or int(float(epoch)) < epochs_done  # the next epoch's first step: not yet


class _AppendingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_point: tuple[int, int]) -> None:
        super().__init__(log_dir)
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            self.metrics_keys = list(reader.fieldnames or [])
            rows = [r for r in reader if _covered(r, *resume_point)]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.metrics_file_path, text.getvalue())  # a failure keeps the old file

    def _check_log_dir_exists(self) -> None:
        """Keep what is there: rows go after it (a header that grows is rewritten with it)."""


class CSVLogger(_CSVLogger):
    """``resume_point``: (global step, epochs done) of the checkpoint a run resumes from."""

    def __init__(self, *args, resume_point=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_point = resume_point

    @property
    def experiment(self):
        if self._experiment is None and self.resume_point is not None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, tuple(self.resume_point))
        return super().experiment


def run_loggers(cfg, resume_ckpt=None, rule=None):
    """The loggers of the config's ``logger`` group (False: none); a resumed run's CSV logger
    continues its metrics.csv, a W&B run is named from the run (``wandb_run_info``)."""
    point = None
    if resume_ckpt is not None:  # a resumed run continues the metrics.csv of the run it resumes
        point = (int(resume_ckpt.get("global_step", 0)),
                 len((resume_ckpt.get("lcredit") or {}).get("history") or []))
    out = []
    for node in (cfg.get("logger") or {}).values():
        if node is not None and "_target_" in node:
            cls = get_class(node._target_)
            extra = {"resume_point": point} if cls is CSVLogger else {}
            if issubclass(cls, WandbLogger):  # `config` is also instantiate()'s own argument
                opts = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items()
                        if not k.startswith("_")}
                out.append(cls(**(opts | wandb_run_info(cfg, node, rule))))
                continue
            out.append(instantiate(node, **extra))
    return out or False


def wandb_run_info(cfg, node, rule) -> dict:
    """What a researcher sets by hand on a W&B run, where the config leaves it null: the resolved
    config, the group (the study, or the sweep), a name (the job's overrides and seed), the job
    type (the rule) and tags (the config's, plus rule, model and data)."""
    study = cfg.get("study")
    multirun = HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN"
    group = node.get("group")
    if group is None and study is not None:
        group = f"{study.get('name')}/{cfg.get('scale', 'paper')}"
    elif group is None and multirun:
        group = Path(str(HydraConfig.get().sweep.dir)).as_posix()
    name = node.get("name")
    if name is None:
        job = (study.get("job") if study is not None else None) or (
            job_dirname(list(HydraConfig.get().overrides.task)) if HydraConfig.initialized()
            else None)
        name = f"{job}/seed={cfg.seed}" if job and job != "defaults" else f"seed={cfg.seed}"
    rule_name = getattr(rule, "name", None) or str(cfg.method.get("_target_", "")).rsplit(".", 1)[-1]
    data = cfg.data.get("name") or str(cfg.data.get("_target_", "")).rsplit(".", 1)[-1]
    model = str(cfg.model.get("_target_", "")).rsplit(".", 1)[-1].lower()
    tags = [str(t) for t in (node.get("tags") or [])] + [f"rule:{rule_name}", f"model:{model}",
                                                          f"data:{data}"]
    if study is not None:
        tags.append(f"study:{study.get('name')}")
    return {"group": group, "name": name, "job_type": node.get("job_type") or rule_name,
            "tags": sorted(set(tags)), "config": OmegaConf.to_container(cfg, resolve=True)}



def wandb_summary(trainer, results: dict) -> None:
    """The run's verdict, first-fire epochs and abort record in the W&B run summary."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            report = results.get("protocol") or {}
            logger.experiment.summary.update({
                "status": results["status"], "verdict": report.get("verdict"),
                "reasons": report.get("reasons"),
                "first_fired": results.get("protocol_first_fired"),
                "abort": results.get("abort"), "final": results.get("final"),
                "gamma_hidden": (report.get("aggregates") or {}).get("gamma_hidden")})
            logger.experiment.finish()



# Lightning's messages a user of lcredit cannot act on: advertising tips, the checkpoint
# loader's note on `weights_only` (lcredit reads its own checkpoints), and a deprecation inside
# Lightning's own code. Everything else Lightning says is kept.
UNACTIONABLE = (r"💡 Tip", r"`weights_only` was not set")
UNACTIONABLE_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)` is deprecated",)


class _Unactionable(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(p) for p in UNACTIONABLE)


def quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        log_ = logging.getLogger(name)
        if not any(isinstance(f, _Unactionable) for f in log_.filters):
            log_.addFilter(_Unactionable())
    for pattern in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
