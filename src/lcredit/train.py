"""Train one learning rule: ``python -m lcredit.train method=fa model.depth=8 seed=1,2 -m``.

The command line of ``lcredit.training.train`` (docs/architecture.md): Hydra composes the run's
config, a mistake is one line and exit 2, and in a sweep one failed job is recorded and the
sweep carries on.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lcredit import files
from lcredit.build import CONF_DIR
from lcredit.cli import check_hydra_dirs, hydra_entry, quote_path_overrides
from lcredit.errors import ConfigError, DirectoryBusy
from lcredit.jobs import single_job_argv
from lcredit.results import failure_record, write_json
from lcredit.training import RunAborted, train  # noqa: F401  (the Python API, here too)

log = logging.getLogger("lcredit")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    try:
        train(cfg)
    except RunAborted as err:  # nothing to do, and nothing wrong
        print(f"lcredit: {err}", file=sys.stderr)
    except ConfigError as err:
        print(f"lcredit: error: {err}", file=sys.stderr)
        if not multirun:
            raise SystemExit(2) from None
        if not isinstance(err, DirectoryBusy):  # never a record into a live run's directory
            _record_failure(cfg, err)
    except Exception as err:  # noqa: BLE001 — one failed job must not end a sweep
        if files.is_disk_full(err):  # the record is written; a traceback would tell nothing more
            print(f"lcredit: error: {cfg.paths.output_dir}: no space left on the device; the run "
                  f"is recorded as failed and its last checkpoint is intact", file=sys.stderr)
            if not multirun:
                raise SystemExit(1) from None
            _record_failure(cfg, err)
            return
        if not multirun:
            raise
        log.exception("job failed; the sweep carries on")
        _record_failure(cfg, err)


def _record_failure(cfg: DictConfig, err: Exception) -> None:
    """A failed sweep job's results.json (unless train() already wrote one with its history)."""
    out_dir = Path(cfg.paths.output_dir)
    path = out_dir / "results.json"
    try:
        if path.is_file() and json.loads(path.read_text()).get("status") == "failed":
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, failure_record(cfg, err))
    except OSError as io_err:
        log.error("could not record the failure in %s: %s", path, io_err)


if __name__ == "__main__":
    quote_path_overrides()
    check_hydra_dirs("lcredit")
    try:  # experiment=<study> arm=<arm>: one job of the study, as its sweep would run it
        sys.argv = single_job_argv(sys.argv)
    except ConfigError as err:
        print(f"lcredit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    hydra_entry("lcredit", main)
