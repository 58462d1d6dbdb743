"""Command-line helpers shared by the entry points."""
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lcredit.errors import ConfigError, check_config_finite
from lcredit.options import unknown_key
from lcredit.results import write_json, write_text

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


def hydra_error_line(err) -> str:
    """Hydra's or OmegaConf's multi-line message about a command line as one line: an override
    of a key nothing has names the nearest key; a group option that does not exist lists the
    options there."""
    cause = err.__cause__ if err.__cause__ is not None else err
    node, key = getattr(cause, "parent_node", None), getattr(cause, "key", None)
    full_key = getattr(cause, "full_key", None)
    if node is not None and key is not None and full_key and "not in struct" in str(cause):
        prefix = full_key[:-len(str(key))] if full_key.endswith(str(key)) else ""
        try:
            known = [str(k) for k in node.keys()]
        except Exception:  # noqa: BLE001 — a node that cannot list its keys
            known = []
        return str(unknown_key(key, known, prefix, "no such option"))
    text = str(err).split("Config search path")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()
             and "HYDRA_FULL_ERROR" not in ln and not ln.strip().startswith("See https://")]
    override = getattr(err, "override", None) or getattr(cause, "override", None)
    out: list[str] = [f"{override}:"] if isinstance(override, str) else []
    for ln in lines:  # "Available options in 'method':" followed by one option a line
        if out and out[-1].endswith(":"):
            out[-1] += " " + ln
        elif out and out[-1].startswith("Available options") and ":" in out[-1]:
            out[-1] += ", " + ln
        else:
            out.append(ln)
    return "; ".join(out) or type(err).__name__


def register_resolvers() -> None:
    """lcredit's config resolvers (``${lcredit_subdir:...}``: a sweep job's directory name,
    ``job_dirname``). Every entry point calls it before Hydra reads a config (``hydra_entry``,
    ``jobs.compose_job``, the study); a launcher's worker process gets it from ``SweepSummary``,
    the Hydra callback every run carries, when that is unpickled there — before the worker
    resolves ``hydra.sweep.subdir``. Calling it again does nothing."""
    if not OmegaConf.has_resolver("lcredit_subdir"):
        OmegaConf.register_new_resolver(
            "lcredit_subdir", lambda overrides: job_dirname(OmegaConf.to_container(overrides)
                                                            if OmegaConf.is_config(overrides)
                                                            else overrides))


def hydra_entry(tool: str, main) -> None:
    """Run a ``@hydra.main`` entry point so that Hydra's own errors about the command line (an
    override of a key that does not exist, a group option that does not exist, override
    syntax) are one line and exit code 2, like lcredit's own; anything else is raised as it
    is (``HYDRA_FULL_ERROR=1`` set by the user keeps Hydra's full messages)."""
    register_resolvers()
    before = os.environ.get("HYDRA_FULL_ERROR")
    if before == "1":
        return main()
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then raises, instead of printing and exit 1
    try:
        main()
    except (HydraException, OmegaConfBaseException) as err:
        print(f"{tool}: error: {hydra_error_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:  # the user's own setting, as it was
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def as_list(key: str, value) -> list:
    """A list option given as a list, or as one bare value (``rules=sb``, ``step_sizes=0.1``)."""
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
    known = set(OmegaConf.load(Path(__file__).resolve().parent / "conf" / f"{tool}.yaml"))
    for key in cfg:
        if key not in known:
            raise unknown_key(key, known - {"hydra", "defaults"}, what=f"no such option of "
                                                                    f"lcredit.{tool}")


def run_snapshot_tool(tool: str, cfg, compute, to_markdown) -> None:
    """The shell of a tool that reads a checkpoint (probe, exploit): a bad input is one line
    and exit code 2; the result goes to ``<tool>.json`` and ``<tool>.md`` in ``cfg.out``, by
    default the checkpoint's run directory (``<tool>-2.json``, ... where those exist)."""
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
                "protocol.print_report", "protocol.every_n_epochs", "protocol.cheap_every",
                "protocol.frozen_baseline",
                "trainer.enable_progress_bar",
                "trainer.log_every_n_steps", "tags", "resume")
DIRNAME_MAX = 80


def job_dirname(overrides) -> str:
    """A sweep job's directory name from its overrides: short (at most DIRNAME_MAX characters,
    a stable hash standing for the rest), one path segment (a path-valued override appears as a
    hash of the path), readable (paths, logging and measurement settings appear only as one
    short hash, ``~xxxxxx``, so jobs that differ only there still get their own directories),
    and ``defaults`` when nothing is left."""
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
    when any failed, so a script or scheduler sees the failure (jobs still run to the end).
    Unpickled in a launcher's worker (joblib, submitit), it registers lcredit's resolvers there
    first: the worker resolves the job's directory before any lcredit code runs."""

    def __setstate__(self, state) -> None:
        register_resolvers()
        self.__dict__.update(state)

    def on_multirun_end(self, config, **kwargs) -> None:
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
