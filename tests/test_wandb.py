"""W&B runs a dashboard can group and filter: config, group, name, job type, tags, per-layer
metrics, the protocol report as a table, the verdict in the summary; the report's figures."""
import json
from pathlib import Path

import pytest

from test_cluster import TINY

pytestmark = pytest.mark.slow


def _wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline run's .wandb file (W&B's LevelDB-style log: a 7-byte
    ':W&B' header, 32 KiB blocks, each chunk a 7-byte header (crc, length, type) and its bytes)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full, or the last piece of a record
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_a_wandb_run_carries_config_group_name_metrics_and_the_protocol_table(make_cfg, tmp_path):
    from lcredit.train import train

    cfg = make_cfg(*[o for o in TINY if not o.startswith("logger=")], "logger=wandb",
                   "protocol.every_n_epochs=1", "seed=4", "tags=[pilot]")
    res = train(cfg)
    (run_dir,) = Path(res["output_dir"]).glob("wandb/offline-run-*")
    recs = _wandb_records(run_dir)
    kinds = {r.WhichOneof("record_type") for r in recs}
    assert {"run", "history", "summary"} <= kinds, kinds
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    assert run.job_type == "dfa" and run.display_name == "seed=4", (run.job_type, run.display_name)
    assert {"pilot", "rule:dfa", "model:resmlp", "data:ladder"} <= set(run.tags)
    assert run.run_group == "" and run.project == "lcredit"  # a lone run: no sweep to group by
    config = {_key(i) for r in recs if r.WhichOneof("record_type") in ("run", "config")
              for i in (r.run.config.update if r.WhichOneof("record_type") == "run" else r.config.update)}
    assert {"method", "model", "data", "protocol", "seed"} <= config, config
    keys = {_key(i) for r in recs if r.WhichOneof("record_type") == "history" for i in r.history.item}
    for k in ("diag/gamma/l1", "diag/hidden_norm/l2", "diag/log10_hidden_norm/l2",
              "diag/bp_grad_norm/l2", "diag/rho/l1", "protocol/a", "protocol/report/_type"):
        assert k in keys, k
    # the protocol report as a table, one row per layer, at each of the 2 measurements
    from lcredit.callbacks.protocol import REPORT_COLUMNS

    tables = sorted(run_dir.glob("files/media/table/protocol/report_*.table.json"))
    assert len(tables) == 2, tables
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == REPORT_COLUMNS and len(table["data"]) == 3  # layers 0..2
    assert {row[8] for row in table["data"]} <= {"trustworthy", "walk back"}
    summary = {_key(i): i.value_json for r in recs if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert json.loads(summary["verdict"]) in ("trustworthy", "walk back")
    assert "first_fired" in summary and "abort" in summary


def test_a_study_sweeps_wandb_group_is_the_study(make_cfg):
    from lcredit.loggers import wandb_run_info

    cfg = make_cfg("experiment=six_rule_audit", "scale=smoke", "++study.arm=bp", "++study.job=bp",
                   "logger=wandb")
    info = wandb_run_info(cfg, cfg.logger.wandb, None)
    assert info["group"] == "six_rule_audit/smoke" and info["name"] == "bp/seed=0"
    assert "study:six_rule_audit" in info["tags"] and info["config"]["scale"] == "smoke"


def test_the_report_uploads_its_figures_and_tables_to_wandb(make_cfg, tmp_path):
    from lcredit.report import report
    from lcredit.train import train

    for seed in (0, 1):
        train(make_cfg(*TINY, f"seed={seed}", out=f"sweep/dfa/seed{seed}"))
    root = tmp_path / "sweep"
    written = report([root], wandb_mode="offline")
    (run_dir,) = (root / "report" / "wandb").glob("offline-run-*")
    images = sorted(p.name for p in run_dir.glob("files/media/images/figures/*.png"))
    pngs = sorted(p.stem for p in written if p.suffix == ".png")
    assert len(images) == len(pngs) == 3, (images, pngs)
    assert list(run_dir.glob("files/media/table/tables/*.table.json"))
    run = next(r.run for r in _wandb_records(run_dir) if r.WhichOneof("record_type") == "run")
    assert run.job_type == "report" and run.run_group.startswith("sweep/")
