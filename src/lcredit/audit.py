"""Post-hoc protocol audit of any checkpoint: ``python -m lcredit.audit ckpt=<path>``.

The command line of ``lcredit.analysis.audit`` (docs/architecture.md): the checkpoint tool's
options from conf/audit.yaml, through ``lcredit.cli.run_snapshot_tool``.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from lcredit.analysis.audit import (audit,  # noqa: F401  (the tool's Python API, here too)
                                    to_markdown)
from lcredit.build import CONF_DIR
from lcredit.cli import check_hydra_dirs, hydra_entry, quote_path_overrides, run_snapshot_tool


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="audit")
def main(cfg: DictConfig) -> None:
    """One path with probe and exploit (lcredit.cli.run_snapshot_tool): the keys and numbers
    checked, ``out`` checked before the work, ``audit.json`` (``audit-2.json``, ... beside
    earlier ones) and ``audit.md``."""
    run_snapshot_tool("audit", cfg, lambda: audit(
        cfg.ckpt, thresholds=OmegaConf.to_container(cfg.thresholds),
        frozen_baseline=cfg.frozen_baseline, data_root=cfg.data_root).to_dict(), to_markdown)


if __name__ == "__main__":
    quote_path_overrides()
    check_hydra_dirs("lcredit.audit")
    hydra_entry("lcredit.audit", main)
