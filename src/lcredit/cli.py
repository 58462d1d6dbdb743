"""Command-line helpers shared by the entry points."""
import sys
from pathlib import Path

# Overrides whose values are file paths. Sweep directories contain '=' and ',', which Hydra's
# override grammar would otherwise parse as syntax; such values are quoted before Hydra sees them.
PATH_KEYS = ("ckpt", "out", "resume", "init_from", "data_root", "frozen_baseline", "protocol.frozen_baseline",
             "data.root", "paths.output_dir", "paths.cache_dir", "paths.data_root",
             "hydra.run.dir", "hydra.sweep.dir")


def quote_path_overrides(argv=None) -> None:
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv[1:], start=1):
        key, sep, value = arg.partition("=")
        if not sep or key.lstrip("+~") not in PATH_KEYS or not value:
            continue
        if value[0] in "'\"" or "$" in value:
            continue  # already quoted, or an interpolation
        if any(c in value for c in "=,[]{}() '"):
            argv[i] = f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_snapshot_tool(tool: str, cfg, compute, to_markdown) -> None:
    """The shell of a tool that reads a checkpoint (probe, exploit): a bad input is one line
    and exit code 2; the result goes to ``<tool>.json`` and ``<tool>.md`` in ``cfg.out``, by
    default the checkpoint's run directory."""
    from lcredit.errors import ConfigError
    from lcredit.train import write_json

    try:
        result = compute()
    except ConfigError as err:
        print(f"lcredit.{tool}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parent.parent
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{tool}.json", result)
    text = to_markdown(result)
    (out / f"{tool}.md").write_text(text)
    print(text)
    print(f"{tool}: {out / f'{tool}.json'}")
