"""lcredit: train and audit local credit-assignment learning rules against backprop, per layer."""

__version__ = "0.1.0"


def diagnose(*args, **kwargs):
    """See :func:`lcredit.diagnostics.diagnose` (imported lazily: torch-free package import)."""
    from lcredit.diagnostics import diagnose as _diagnose

    return _diagnose(*args, **kwargs)
