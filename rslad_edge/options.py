"""A stage's typed config as the one source of its options.

A config field declared with :func:`option` carries its default, its help (units included) and, where the command
line writes its value as text (``8/255``, ``96x128``, ``1,8,64``, ``k=v,...``), the parser of that text. Everything
else is derived from these declarations, so nothing about an option is written twice:

- the command's options (:func:`command`), whose help shows the real default (and where a preset differs);
- the keys a config file or a pipeline section takes (:func:`key_table`, :func:`read_mapping`): every field, under
  its name or any of its flags, with a close match for a typo and a one-line error for a value of the wrong type;
- which options a resumed run may change (``resumable``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Union

import yaml

from rslad_edge.errors import ConfigError

_METADATA_KEY = "rslad_edge.option"


@dataclass(frozen=True)
class Option:
    """What a config field says about itself as an option."""

    help: str
    flags: tuple[str, ...] = ()  # command-line names; the first names the option in messages; "--x/--no-x" for bools
    parse: Callable[[str], Any] | None = None  # the option's text -> its value; raises ConfigError saying why not
    default_text: str | None = None  # the default in words, where the value alone does not say it
    show: Callable[[Any], str] | None = None  # a value as the help writes it (8/255), when str() does not
    metavar: str | None = None
    positional: bool = False  # a command-line argument (CHECKPOINT, ARTIFACT), not an option
    cli: bool = True  # False: a config-file key only
    resumable: bool = False  # a resumed run may change it


def option(
    default: Any = MISSING,
    *,
    help: str,
    flags: Iterable[str] = (),
    parse: Callable[[str], Any] | None = None,
    default_text: str | None = None,
    show: Callable[[Any], str] | None = None,
    metavar: str | None = None,
    positional: bool = False,
    cli: bool = True,
    resumable: bool = False,
) -> Any:
    """A dataclass field that is also an option; a mutable default (a list, a dict) is copied for each instance."""
    declared = Option(help=help, flags=tuple(flags), parse=parse, default_text=default_text, show=show,
                      metavar=metavar, positional=positional, cli=cli, resumable=resumable)
    metadata = {_METADATA_KEY: declared}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def same_option(cls: type, name: str, *, convert: Callable[[Any], Any] | None = None) -> Any:
    """A field that is ``cls``'s option ``name`` again (its default, help and parsing), for a config that offers
    another config's option under its own field; ``convert`` turns the default into this field's type."""
    source = next(f for f in dataclasses.fields(cls) if f.name == name)
    if source.default_factory is not MISSING:
        default = source.default_factory()
    else:
        default = source.default
    if convert is not None and default is not MISSING:
        default = convert(default)
    opt = source.metadata[_METADATA_KEY]
    return option(default, **{f.name: getattr(opt, f.name) for f in dataclasses.fields(Option)})


@dataclass(frozen=True)
class Spec:
    """One option of a config class: its field, type, declaration and default (MISSING when required)."""

    name: str
    annotation: Any
    option: Option
    default: Any

    @property
    def flag(self) -> str:
        """``--teacher-arch``: the name messages use."""
        return self.option.flags[0].split("/")[0] if self.option.flags else "--" + self.name.replace("_", "-")

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys a config file may give it under: the field's name and each flag's (dashes as underscores)."""
        names = [self.name] + [normal_key(flag.split("/")[0]) for flag in self.option.flags]
        return tuple(dict.fromkeys(names))

    def convert(self, value: Any) -> Any:
        """A config file's value as the field takes it: as it is when of the field's type, else a scalar is read as
        the option's text (``eps: 8/255``, ``input-size: 96``, ``batch: 8``); anything else is a ConfigError."""
        if conforms(value, self.annotation):
            return value
        if self.option.parse is not None and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return self.option.parse(str(value))
        raise ConfigError(f"expected {describe(self.annotation)}, got {value!r}")


@functools.cache
def specs(cls: type) -> dict[str, Spec]:
    """Every option field of the dataclass ``cls``, by field name, in declaration order."""
    hints = typing.get_type_hints(cls)
    table = {}
    for f in dataclasses.fields(cls):
        opt = f.metadata.get(_METADATA_KEY)
        if opt is None:
            continue
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        table[f.name] = Spec(f.name, hints[f.name], opt, default)
    return table


def normal_key(key: Any) -> str:
    """``--batch-size``, ``batch-size`` and ``batch_size`` are one key."""
    return str(key).lstrip("-").replace("-", "_")


def dashed(key: str) -> str:
    return key.replace("_", "-")


def key_table(*classes: type, exclude: Iterable[str] = ()) -> dict[str, Spec]:
    """Key -> option, for a config file holding the options of ``classes`` (all but the fields in ``exclude``)."""
    excluded = set(exclude)
    table: dict[str, Spec] = {}
    for cls in classes:
        for spec in specs(cls).values():
            if spec.name not in excluded:
                table.update({key: spec for key in spec.keys})
    return table


def read_mapping(
    values: Mapping[str, Any],
    table: Mapping[str, Spec],
    *,
    where: str,
    error: type[ConfigError] = ConfigError,
    reserved: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Field name -> value for a config file's (or a pipeline section's) ``values``, each key known to ``table``
    and each value converted by :meth:`Spec.convert`; ``reserved``: keys refused with a reason. Errors are one
    line starting with ``where``, naming the key."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = normal_key(key)
        spec = table.get(name)
        if spec is None:
            if reserved and name in reserved:
                raise error(f"{where}: unknown key '{dashed(name)}' ({reserved[name]})")
            close = difflib.get_close_matches(name, list(table), n=1)
            hint = f" (did you mean '{dashed(close[0])}'?)" if close else ""
            raise error(f"{where}: unknown key '{dashed(name)}'{hint}")
        try:
            out[spec.name] = spec.convert(value)
        except ConfigError as exc:
            raise error(f"{where}, key '{dashed(name)}': {exc}") from None
    return out


# ------------------------------------------------------------------------------------------------- parsers


def comma_list(text: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``."""
    return [part for part in text.replace(" ", "").split(",") if part]


def comma_ints(example: str) -> Callable[[str], list[int]]:
    """A parser of ``"215,260,285"`` -> ``[215, 260, 285]``; ``example`` shows the form in its error."""

    def parse(text: str) -> list[int]:
        try:
            return [int(part) for part in comma_list(text)]
        except ValueError:
            raise ConfigError(f"expected comma-separated integers like {example}, got '{text}'") from None

    return parse


def key_values(text: str) -> dict[str, Any]:
    """``"width_mult=0.75,dropout=0.2"`` -> ``{"width_mult": 0.75, "dropout": 0.2}`` (values read as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"takes KEY=VALUE[,KEY=VALUE] (e.g. width_mult=0.75), got '{item}'")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def levels_text(value: float) -> str:
    """8/255 when a budget in [0, 1] is a whole number of grey levels (as the papers write it), else the number."""
    levels = value * 255
    return f"{round(levels)}/255" if abs(levels - round(levels)) < 1e-6 else f"{value:g}"


# ------------------------------------------------------------------------------------------------- types


def conforms(value: Any, annotation: Any) -> bool:
    """Whether a value read from YAML has the type ``annotation`` says (an int is a float; a bool is not an int)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(conforms(item, args[0]) for item in value if args)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is Path:
        return isinstance(value, (str, Path))
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def describe(annotation: Any) -> str:
    """``int | None`` -> "an integer or null", for error messages."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        parts = [describe(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in typing.get_args(annotation) else "")
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        plural = {int: "integers", float: "numbers", str: "strings", Path: "paths"}
        return f"a list of {plural.get(args[0], describe(args[0]))}" if args else "a list"
    if origin is dict:
        return "a mapping of option: value"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


# ------------------------------------------------------------------------------------------------- the command line


def command(
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    notes: Mapping[str, Mapping[str, Any]] | None = None,
    show_defaults: bool = True,
    help_prefix: str = "",
    own_first: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a Typer command so that it takes ``cls``'s options (all, ``only`` these, or all but ``exclude``)
    besides its own parameters. The command is called with its own parameters and ``given``: field name -> value
    of each option given on the command line, already parsed (a parse error is a usage error naming the flag, exit
    2). Each option's help starts with ``help_prefix`` (``{key}``: the option's config key) and ends with its
    default, then the values ``notes`` (label -> field -> value, e.g. the presets) give it where they differ.
    Arguments come first, then ``cls``'s options and the command's own (these first with ``own_first``)."""
    chosen = [spec for spec in specs(cls).values()
              if spec.option.cli and (only is None or spec.name in only) and spec.name not in set(exclude)]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(func, include_extras=True)
        own = [parameter.replace(annotation=hints.get(name, parameter.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
               for name, parameter in inspect.signature(func).parameters.items() if name != "given"]
        derived = [_parameter(spec, notes or {}, show_defaults=show_defaults, help_prefix=help_prefix)
                   for spec in chosen]
        clash = {p.name for p in own} & {p.name for p in derived}
        if clash:
            raise TypeError(f"{func.__name__} declares {sorted(clash)}, which {cls.__name__} already has")
        every = [*own, *derived] if own_first else [*derived, *own]
        arguments = [p for p in every if _is_argument(p)]
        names = [spec.name for spec in chosen]

        def run(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            return func(given={k: v for k, v in given.items() if v is not None}, **kwargs)

        run.__signature__ = inspect.Signature([*arguments, *(p for p in every if not _is_argument(p))])
        run.__name__, run.__qualname__, run.__doc__ = func.__name__, func.__qualname__, func.__doc__
        run.__module__ = func.__module__
        return run

    return decorate


def _is_argument(parameter: inspect.Parameter) -> bool:
    import typer.models

    metadata = getattr(parameter.annotation, "__metadata__", ())
    return any(isinstance(meta, typer.models.ArgumentInfo) for meta in metadata)


def _parameter(spec: Spec, notes: Mapping[str, Mapping[str, Any]], *, show_defaults: bool,
               help_prefix: str) -> inspect.Parameter:
    import typer
    from rich.markup import escape

    text = help_prefix.format(key=dashed(spec.name)) + spec.option.help
    default = help_default(spec, notes) if show_defaults else None
    help_text = escape(text + (f" [default: {default}]" if default else ""))
    kind = inspect.Parameter.KEYWORD_ONLY
    if spec.option.positional:
        info = typer.Argument(metavar=spec.option.metavar, help=help_text, show_default=False)
        return inspect.Parameter(spec.name, kind, annotation=Annotated[_cli_type(spec), info])
    flags = spec.option.flags or ((f"--{dashed(spec.name)}/--no-{dashed(spec.name)}",) if spec.annotation is bool
                                  else (f"--{dashed(spec.name)}",))
    callback = _parse_callback(spec.option.parse) if spec.option.parse is not None else None
    info = typer.Option(*flags, help=help_text, show_default=False, metavar=spec.option.metavar, callback=callback)
    return inspect.Parameter(spec.name, kind, default=None, annotation=Annotated[_cli_type(spec) | None, info])


def _cli_type(spec: Spec) -> Any:
    """What the command line reads: the option's text when the field parses it, else the field's type."""
    if spec.option.parse is not None:
        return str
    args = [arg for arg in typing.get_args(spec.annotation) if arg is not type(None)]
    if typing.get_origin(spec.annotation) in (Union, types.UnionType):
        return str if str in args else args[0]
    return spec.annotation


def _parse_callback(parse: Callable[[str], Any]) -> Callable[[Any], Any]:
    import typer

    def callback(value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc)) from None

    return callback


def help_default(spec: Spec, notes: Mapping[str, Mapping[str, Any]] | None = None) -> str | None:
    """The default an option's help shows: ``0.1``, ``216,261,286``, ``8/255``; then where ``notes`` differ:
    ``300; fast: 50; ard, iad: 200``."""
    default = spec.option.default_text or _show(spec, spec.default)
    differing: dict[str, list[str]] = {}
    for label, values in (notes or {}).items():
        if spec.name in values and values[spec.name] != spec.default:
            differing.setdefault(_show(spec, values[spec.name]) or "none", []).append(label)
    extra = "; ".join(f"{', '.join(labels)}: {shown}" for shown, labels in differing.items())
    return "; ".join(part for part in (default, extra) if part) or None


def _show(spec: Spec, value: Any) -> str | None:
    if value is MISSING or value is None or (isinstance(value, (list, tuple, dict)) and not value):
        return None
    if spec.option.show is not None:
        return spec.option.show(value)
    if isinstance(value, bool):
        flag = spec.option.flags[0] if spec.option.flags else f"--{dashed(spec.name)}/--no-{dashed(spec.name)}"
        on, _, off = flag.partition("/")
        return (on if value else off).lstrip("-") or None
    if isinstance(value, (list, tuple)):
        return ",".join(_show(spec, item) or "" for item in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)
