"""Command-line helpers shared by the entry points."""
import difflib
import sys
import tempfile
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


def check_hydra_dirs(tool: str, argv=None) -> None:
    """``hydra.run.dir=`` / ``hydra.sweep.dir=`` given on the command line is a directory this
    process can write into, checked before Hydra makes it (Hydra's own failure there is a
    traceback): otherwise one line and exit 2."""
    argv = sys.argv if argv is None else argv
    for arg in argv[1:]:
        key, sep, value = arg.partition("=")
        if not sep or key.lstrip("+~") not in ("hydra.run.dir", "hydra.sweep.dir"):
            continue
        path = Path(value.strip("'\""))
        if "$" in value:  # an interpolation: Hydra resolves it
            continue
        try:
            path.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
        except OSError as err:
            print(f"{tool}: error: {key}={path}: cannot write there ({err.strerror or err})",
                  file=sys.stderr)
            raise SystemExit(2) from None


def as_list(key: str, value) -> list:
    """A list option given as a list, or as one bare value (``rules=sb``, ``step_sizes=0.1``)."""
    from omegaconf import ListConfig, OmegaConf

    from lcredit.errors import ConfigError

    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key}={value!r} must be a non-empty list, e.g. {key}=[a,b]")
    return value


def free_path(out: Path, tool: str) -> Path:
    """``<tool>.json`` in ``out``, or ``<tool>-2.json``, ... : a result never overwrites another."""
    path, n = out / f"{tool}.json", 1
    while path.exists():
        n += 1
        path = out / f"{tool}-{n}.json"
    return path


def check_tool_keys(tool: str, cfg) -> None:
    """Every key of a tool's config is one its yaml defines (``overrides`` and ``thresholds``
    hold per-rule / per-diagnostic options, checked where they are used)."""
    from omegaconf import OmegaConf

    from lcredit.errors import ConfigError

    known = set(OmegaConf.load(Path(__file__).resolve().parent / "conf" / f"{tool}.yaml"))
    for key in cfg:
        if key not in known:
            near = difflib.get_close_matches(str(key), sorted(map(str, known - {"hydra",
                                                                               "defaults"})), n=1)
            raise ConfigError(f"{key}: no such option of lcredit.{tool}"
                              + (f"; did you mean {near[0]}?" if near else ""))


def run_snapshot_tool(tool: str, cfg, compute, to_markdown) -> None:
    """The shell of a tool that reads a checkpoint (probe, exploit): a bad input is one line
    and exit code 2; the result goes to ``<tool>.json`` and ``<tool>.md`` in ``cfg.out``, by
    default the checkpoint's run directory (``<tool>-2.json``, ... where those exist)."""
    from omegaconf import OmegaConf

    from lcredit.errors import ConfigError, check_config_finite
    from lcredit.results import write_json, write_text

    try:
        if OmegaConf.is_missing(cfg, "ckpt"):
            raise ConfigError(f"ckpt is required: python -m lcredit.{tool} ckpt=<run dir>/checkpoints/last.ckpt")
        check_tool_keys(tool, cfg)
        check_config_finite(cfg)
        out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parent.parent
        try:  # before the work: a result must not be lost for want of a place to put it
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
        except OSError as err:
            raise ConfigError(f"out={out}: cannot write there ({err.strerror or err})") from None
        result = compute()
    except ConfigError as err:
        print(f"lcredit.{tool}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    path = free_path(out, tool)
    write_json(path, result)
    text = to_markdown(result)
    write_text(path.with_suffix(".md"), text)
    print(text)
    print(f"{tool}: {path}")


# Overrides that do not make a job a different run: where it writes, how it logs, how the
# protocol measures it. Left out of sweep directory names (config.yaml keeps every override).
DIRNAME_SKIP = ("paths.", "logger", "callbacks", "protocol.measure.",
                "protocol.print_report", "protocol.every_n_epochs", "protocol.frozen_baseline",
                "trainer.enable_progress_bar",
                "trainer.log_every_n_steps", "tags", "resume")
DIRNAME_MAX = 80


def job_dirname(overrides) -> str:
    """A sweep job's directory name from its overrides: short (at most DIRNAME_MAX characters,
    a stable hash standing for the rest), one path segment (a path-valued override appears as a
    hash of the path), readable (paths, logging and measurement settings appear only as one
    short hash, ``~xxxxxx``, so jobs that differ only there still get their own directories),
    and ``defaults`` when nothing is left."""
    import hashlib
    import re

    parts, left_out = [], []
    for item in overrides or []:  # a study's job is named by its arm and axis point
        key, sep, value = str(item).lstrip("+~").partition("=")
        if key == "study.job":
            return re.sub(r"[^A-Za-z0-9._,=+@%~-]", "_", value.strip("'\""))[:120] or "defaults"
    for item in overrides or []:
        key, sep, value = str(item).lstrip("+~").partition("=")
        if not sep or key == "seed" or key.startswith("hydra."):
            continue
        if key.startswith(DIRNAME_SKIP):
            left_out.append(f"{key}={value}")
            continue
        if "/" in value or "\\" in value or key in PATH_KEYS:
            value = "h" + hashlib.sha1(value.encode()).hexdigest()[:6]
        parts.append(f"{key}={value}")
    if left_out:  # jobs that differ only there (a sweep over rho_samples) stay apart
        parts.append("~" + hashlib.sha1(",".join(sorted(left_out)).encode()).hexdigest()[:6])
    name = re.sub(r"[^A-Za-z0-9._,=+@%~-]", "_", ",".join(sorted(parts)))
    if len(name) > DIRNAME_MAX:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:DIRNAME_MAX - 9]}~{digest}"
    return name or "defaults"


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency
    _HydraCallback = object


class SweepSummary(_HydraCallback):
    """After a sweep: one line per failed job (its directory and error), and a non-zero exit
    when any failed, so a script or scheduler sees the failure (jobs still run to the end)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        import json

        root = Path(str(config.hydra.sweep.dir))
        failed = []
        for path in sorted(root.glob("**/results.json")):
            try:
                result = json.loads(path.read_text())
            except (OSError, ValueError):
                failed.append((path.parent, "unreadable results.json"))
                continue
            if result.get("status") == "failed":
                failed.append((path.parent, result.get("error", "?")))
        if not failed:
            return
        print(f"lcredit: {len(failed)} job(s) of the sweep failed:", file=sys.stderr)
        for job, err in failed:
            print(f"  {job.relative_to(root) if job.is_relative_to(root) else job}: {err}",
                  file=sys.stderr)
        raise SystemExit(1)
