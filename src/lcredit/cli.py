"""Command-line helpers shared by the entry points."""
import sys

# Overrides whose values are file paths. Sweep directories contain '=' and ',', which Hydra's
# override grammar would otherwise parse as syntax; such values are quoted before Hydra sees them.
PATH_KEYS = ("ckpt", "out", "resume", "data_root", "frozen_baseline", "protocol.frozen_baseline",
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
