"""Every option's type and range, declared once, where the option is read, and checked by one path.

An option is declared by its annotation: on the constructor or function that reads it (a
model's ``d: Count = 256``, a rule's ``aux_lr: Positive = 1e-3``, a tool's ``k: Count = 5``) or,
for a config node no single constructor reads (the protocol, the trainer's limits), on a
``TypedDict``. ``Annotated[int, Range(1)]`` is a whole number >= 1; ``Literal[...]`` a choice;
``X | None`` allows null; ``list[X]`` a list of X; a TypedDict a mapping with those keys.

``check_options`` is the one validation path: the run's config (``lcredit.config.validate``),
Hydra's instantiation of a group, every tool, and a constructor called from Python (``checked``)
all go through it, so a number is refused the same way — finite, in range, a whole number where
one is needed, naming the key — wherever it is given (docs/options.md).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import inspect
import math
import types
import typing
from typing import Annotated, Any, Literal, Union

from omegaconf import OmegaConf

from lcredit.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Range:
    """A number in [lo, hi] (lo excluded where ``lo_open``); None leaves that side open."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def problem(self, value) -> str | None:
        low = self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo))
        if not low and not (self.hi is not None and value > self.hi):
            return None
        if self.lo is not None and self.hi is not None:
            return f"must be in {'(' if self.lo_open else '['}{_shown(self.lo)}, {_shown(self.hi)}]"
        if low:
            return f"must be {'>' if self.lo_open else '>='} {_shown(self.lo)}"
        return f"must be <= {_shown(self.hi)}"


def _shown(bound) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


# The declarations most options share.
Count = Annotated[int, Range(1)]                     # a whole number >= 1
Index = Annotated[int, Range(0)]                     # a whole number >= 0
Seed = Annotated[int, Range(0, 2**32 - 1)]           # a seed numpy and torch both take
Positive = Annotated[float, Range(0.0, lo_open=True)]
NonNegative = Annotated[float, Range(0.0)]
Fraction = Annotated[float, Range(0.0, 1.0)]         # in [0, 1]


def unknown_key(key: str, known, prefix: str = "", what: str = "no such option") -> ConfigError:
    """The error for a key nothing reads, naming the nearest known key (or listing them)."""
    known = sorted(str(k) for k in known)
    near = difflib.get_close_matches(str(key), known, n=1)
    hint = (f"; did you mean {prefix}{near[0]}?" if near else
            f"; the known options: {', '.join(known)}" if known else "")
    return ConfigError(f"{prefix}{key}: {what}{hint}")


# ------------------------------------------------------------------ one value against its type
_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def _plain(value):
    """OmegaConf containers as plain lists and dicts (what the checks below read)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _problem(key: str, value, hint) -> tuple[int, str] | None:
    """Why ``value`` is not a ``hint``: (0, wrong kind) or (1, right kind, out of range);
    None when it is one (or when ``hint`` says nothing lcredit can check)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.TypeVar)):
        return None
    if origin is Annotated:
        return _annotated_problem(key, value, args)
    if origin in (Union, types.UnionType):
        return _union_problem(key, value, args)
    if origin is Literal:
        try:
            ok = any(value == a and type(value) is type(a) or
                     (isinstance(a, float) and isinstance(value, int) and value == a)
                     for a in args)
        except TypeError:
            ok = False
        return None if ok else (0, f"{key}={value!r} is not one of {', '.join(map(str, args))}")
    if value is None:
        return 0, f"{key}=None must be {_describe(hint) or 'given'}"
    if hint is bool:
        return None if isinstance(value, bool) else (0, f"{key}={value!r} must be true or false")
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return 0, f"{key}={value!r} must be {_TYPE_WORDS[hint]}"
        if not math.isfinite(value):  # nan passes every range comparison
            return 1, f"{key}={value!r} must be a finite number"
        if hint is int and not float(value).is_integer():
            return 0, f"{key}={value!r} must be a whole number"
        return None
    if hint is str:
        return None if isinstance(value, str) else (0, f"{key}={value!r} must be a string")
    if typing.is_typeddict(hint):
        if not isinstance(value, dict):
            return 0, f"{key}={value!r} must be a mapping of {', '.join(hint.__annotations__)}"
        try:
            check_options(hint, value, f"{key}.")
        except ConfigError as err:
            return 1, str(err)
        return None
    return _container_problem(key, value, hint, origin, args)


def _annotated_problem(key: str, value, args) -> tuple[int, str] | None:
    """``Annotated[type, Range(...)]``: the type, then the range."""
    found = _problem(key, value, args[0])
    if found:
        return found
    for meta in args[1:]:
        if isinstance(meta, Range):
            why = meta.problem(value)
            if why:
                return 1, f"{key}={value!r} {why}"
    return None


def _union_problem(key: str, value, args) -> tuple[int, str] | None:
    """``X | Y``: fine when one member takes it; a member of the right kind out of its range
    says why; else the kinds it must be."""
    if value is None and type(None) in args:
        return None
    found = [_problem(key, value, m) for m in args if m is not type(None)]
    if any(p is None for p in found):
        return None
    ranged = [p for p in found if p[0] == 1]
    if ranged:
        return ranged[0]
    words = [w for m in args if (w := _describe(m))]
    return 0, f"{key}={value!r} must be {' or '.join(dict.fromkeys(words))}"


def _container_problem(key: str, value, hint, origin, args) -> tuple[int, str] | None:
    """A list (each element) or a mapping (each value), or an instance of a class."""
    if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return 0, f"{key}={value!r} must be a list"
        element = args[0] if args and args[0] is not Ellipsis else None
        for i, v in enumerate(value):
            found = _problem(f"{key}[{i}]", v, element) if element is not None else None
            if found:
                return 1, found[1]
        return None
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return 0, f"{key}={value!r} must be a mapping"
        if len(args) == 2:
            for k, v in value.items():
                found = _problem(f"{key}.{k}", v, args[1])
                if found:
                    return 1, found[1]
        return None
    if isinstance(hint, type) and origin is None:  # a class: an instance of it
        return None if isinstance(value, hint) else (
            0, f"{key}={value!r} must be a {hint.__name__}")
    return None  # a generic alias, a callable signature, ...: the reader decides


def _describe(hint) -> str | None:
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return _describe(typing.get_args(hint)[0])
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (list, tuple) or hint in (list, tuple):
        return "a list"
    if hint is type(None):
        return "null"
    if hint in _TYPE_WORDS:
        return _TYPE_WORDS[hint]
    return f"a {hint.__name__}" if isinstance(hint, type) else None


def check_value(key: str, value, hint) -> None:
    """``value`` is a ``hint`` (see the module's docstring), or a ConfigError naming ``key``."""
    found = _problem(key, _plain(value), hint)
    if found:
        raise ConfigError(found[1])


# ------------------------------------------------------------------ a set of options
@functools.lru_cache(maxsize=None)
def _declared(target) -> tuple[dict, frozenset | None]:
    """{option: declared type} of a callable (its parameters) or a TypedDict (its keys), and
    the names it takes (None: any, a ``**kwargs``)."""
    if typing.is_typeddict(target):
        return (typing.get_type_hints(target, include_extras=True),
                frozenset(target.__required_keys__ | target.__optional_keys__))
    if isinstance(target, type) and dataclasses.is_dataclass(target):  # an options object
        names = frozenset(f.name for f in dataclasses.fields(target))
        hints = typing.get_type_hints(target, include_extras=True)
        return {k: v for k, v in hints.items() if k in names}, names
    fn = inspect.unwrap(target)
    hints = _hints(fn)
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = frozenset(k for k, p in params.items() if p.kind not in (
        inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
    owner = _owner(fn)
    if owner is not None:  # an option a subclass re-lists bare is declared where it was first
        for base in owner.__mro__[1:]:
            init = base.__dict__.get("__init__")
            if init is not None and init is not object.__init__ and inspect.isfunction(
                    inspect.unwrap(init)):
                for k, v in _declared(inspect.unwrap(init))[0].items():
                    if k in names and k not in hints:
                        hints[k] = v
    hints.pop("return", None)
    options = getattr(owner, "Options", None)
    if takes_any and options is not None:  # ``**options`` that the class's Options declares
        declared, option_names = _declared(options)
        hints.update(declared)
        names, takes_any = names | option_names, False
    return {k: v for k, v in hints.items() if k in names}, None if takes_any else names


def _hints(fn) -> dict:
    """A function's annotations as types; one that cannot be resolved (a name only imported
    for type checkers) says nothing, and the others still count."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 — NameError, TypeError: whatever a foreign annotation does
        pass
    out = {}
    for name, text in getattr(fn, "__annotations__", {}).items():
        def one(): ...
        one.__annotations__ = {name: text}
        one.__module__ = fn.__module__
        try:
            out[name] = typing.get_type_hints(one, globalns=getattr(fn, "__globals__", None),
                                              include_extras=True)[name]
        except Exception:  # noqa: BLE001
            continue
    return out


def _owner(fn) -> type | None:
    """The class whose ``__init__`` ``fn`` is (found through its qualified name)."""
    if fn.__name__ != "__init__" or "." not in fn.__qualname__:
        return None
    node = inspect.getmodule(fn)
    for part in fn.__qualname__.split(".")[:-1]:
        node = getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, type) else None


def option_defaults(target) -> dict:
    """{option: default} of a callable's parameters, and of the ``Options`` dataclass a class
    takes as ``**options`` (an estimator rule's): the single source a config group's yaml
    must agree with (tests/test_defaults.py)."""
    fn = inspect.unwrap(target.__init__ if isinstance(target, type) else target)
    out = {k: p.default for k, p in inspect.signature(fn).parameters.items()
           if p.default is not inspect.Parameter.empty}
    options = getattr(target, "Options", None) if isinstance(target, type) else None
    if options is not None and dataclasses.is_dataclass(options):
        out.update({f.name: f.default for f in dataclasses.fields(options)
                    if f.default is not dataclasses.MISSING})
    return out


# Arguments lcredit passes itself (never a user's option): left out of "the known options".
INTERNAL = frozenset({"self", "model", "input_shape", "num_classes", "optimizer", "params"})


def check_options(target, values, prefix: str = "", *, also=None, skip=()) -> None:
    """Every key of ``values`` is an option ``target`` declares (a typo names the nearest) and
    every value is of its declared type and range. ``target``: a callable (its parameters'
    annotations) or a TypedDict; ``also``: a TypedDict of further limits lcredit puts on some
    of them (the trainer's ``max_epochs`` beside Lightning's own ``Optional[int]``)."""
    values = _plain(values)
    if values is None:
        return
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix[:-1] or 'options'}={values!r} must be a mapping of options")
    prefix = f"{prefix}." if prefix and not prefix.endswith(".") else prefix
    hints, names = _declared(target)
    if typing.is_typeddict(target):
        missing = sorted(set(target.__required_keys__) - set(values))
        if missing:
            raise ConfigError(f"{prefix[:-1]}={values!r} needs "
                              f"{', '.join(prefix + m for m in missing)}")
    extra = _declared(also)[0] if also is not None else {}
    for key, value in values.items():
        if key in skip:
            continue
        if names is not None and key not in names:
            raise unknown_key(key, names - INTERNAL, prefix)
        for declared in (hints.get(key), extra.get(key)):
            if declared is not None:
                check_value(f"{prefix}{key}", value, declared)


def checked(prefix: str = "", like=None):
    """Decorate a function (or an ``__init__``) so that the arguments a caller gives are
    checked against their declarations (``check_options``) before it runs: the Python API
    refuses what the command line refuses, with the same message. ``like``: a TypedDict that
    declares the parameters (a callback taking a config node's options as arguments)."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError:
                hints, names = _declared(fn)
                bad = [k for k in kwargs if names is not None and k not in names]
                if bad:
                    raise unknown_key(bad[0], names - INTERNAL, f"{prefix}." if prefix else "") \
                        from None
                raise
            given = {k: v for k, v in bound.arguments.items()
                     if sig.parameters[k].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                       inspect.Parameter.VAR_KEYWORD)
                     and k not in INTERNAL}
            if like is not None:
                declared = _declared(like)[1]
                check_options(like, {k: v for k, v in given.items() if k in declared}, prefix)
            check_options(fn, given, prefix)
            return fn(*args, **kwargs)

        call.__lcredit_checked__ = True
        return call
    return wrap


class CheckedInit:
    """A base class whose subclasses' constructors are ``checked`` (``option_group`` names the
    config group): a new rule or model declares its options' types and ranges in its signature
    and gets the checks, with no call of its own."""
    option_group = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__lcredit_checked__", False):
            cls.__init__ = checked(cls.option_group)(init)
