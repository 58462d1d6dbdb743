"""Frozen-snapshot credit recovery: ``python -m lcredit.probe ckpt=<path> rules=[dfa,sb,cb,vec]``.

The command line of ``lcredit.analysis.probe`` (docs/architecture.md): the checkpoint tool's
options from conf/probe.yaml, through ``lcredit.cli.run_snapshot_tool``.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from lcredit.analysis.probe import (probe,  # noqa: F401  (the tool's Python API, here too)
                                    to_markdown)
from lcredit.build import CONF_DIR
from lcredit.cli import check_hydra_dirs, hydra_entry, quote_path_overrides, run_snapshot_tool


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="probe")
def main(cfg: DictConfig) -> None:
    run_snapshot_tool("probe", cfg, lambda: probe(cfg.ckpt, cfg.rules, cfg.steps,
                           OmegaConf.to_container(cfg.overrides, resolve=True), cfg.batch_size,
                           cfg.data_root, cfg.estimator_optim), to_markdown)


if __name__ == "__main__":
    quote_path_overrides()
    check_hydra_dirs("lcredit.probe")
    hydra_entry("lcredit.probe", main)
