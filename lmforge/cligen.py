"""Command-line parsers generated from typed Python functions and config dataclasses (for `lmforge.cli`).

A verb is a Python function; `build_parser` makes its argparse parser from the signature, the
docstring and the config dataclasses, and `parse` turns the command line into the call:

- a parameter without a default is a positional argument, one with a default a `--kebab-case` flag
  (`Verb.required` makes a parameter a required flag, `Verb.positional` a defaulted one an optional
  positional argument);
- `int`, `float`, `str`, `Path` read the text as such; `X | None` also takes `none` where X is not
  text; `Literal[...]` lists the choices; a `bool` is a switch (`--overwrite`, or `--no-NAME` when the
  default is True); `list[X]` (or `Sequence[X]`, `tuple[X, ...]`) takes one or more values and may be
  repeated (`--stop a --stop b`); a union with `str` reads text (`str | Path | Tokenizer`); `Any` is text;
- a dataclass parameter (`clean: CleanConfig | bool = True`) gives `--clean.FIELD VALUE` for each of
  its fields, and `--no-clean` where bool is in the union;
- `fn.settings = {"model": ModelConfig, "train": TrainConfig}` on the function gives `--model.FIELD
  VALUE` / `--train.FIELD VALUE` flags, passed as `overrides={"model.n_layer": 4, "train.lr": 3e-4}`;
- help: the docstring's text before its "Args:" section describes the verb (its first line is the
  verb's line in `lmforge --help`); each parameter's help is its entry under "Args:" (a parameter
  without one is a declaration error); a dataclass field's help is its `lmforge.config.param` help.
  Defaults are added as "(default: X)".

Every verb also takes `--config FILE`, a YAML mapping of parameters by name plus one mapping per
section (`clean:`, `model:`, `train:`), and `--print-config`, which prints the resolved settings as
such a file and exits. Values merge in order: the function's defaults, the file, the flags. (The
`model:`/`train:` sections hold what was given, not every field: a preset the function applies comes
under them.)

A mistake in the command line or the file is one line on stderr, `lmforge VERB: error: ...`, and
exit code 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import importlib
import inspect
import re
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.config import (
    NoneType,
    convert,
    did_you_mean,
    from_text,
    is_config_type,
    is_list_type,
    read_yaml,
    section_values,
    union_members,
)
from lmforge.errors import UserError

RESERVED = ("config", "print_config")  # the flags every generated verb has


@dataclass
class Verb:
    """One `lmforge` verb: a function made into a parser.

    `name` is the words after `lmforge` ("classify predict"); `function` is "module:function",
    imported only when this verb is parsed (or the function itself). `done` is printed after the call
    returns: a format string of the result (`{result}`) and the arguments by name, or a function
    (result, arguments) -> text, or "module:function" naming one (imported when it is used).
    """

    name: str
    function: str | Callable[..., Any] = ""
    required: tuple[str, ...] = ()  # parameters given as required --flags rather than positionally
    positional: tuple[str, ...] = ()  # parameters with a default, given as optional positional arguments
    hide: tuple[str, ...] = ()  # parameters the command line does not offer (Python callers only)
    fixed: dict[str, Any] = field(default_factory=dict)  # parameters the verb sets (task="summarize")
    aliases: dict[str, str] = field(default_factory=dict)  # older flag spellings: {"--format": "data_format"}
    flat: tuple[str, ...] = ()  # sections whose fields also have flags without the prefix (--beta-schedule)
    done: str | Callable[[Any, dict[str, Any]], str | None] | None = None
    help: str = ""  # the line in `lmforge --help` (default: the docstring's first line)

    @property
    def label(self) -> str:
        """How errors name the verb: `lmforge classify`."""
        return f"lmforge {self.name.split()[0]}"

    def load(self) -> Callable[..., Any]:
        if callable(self.function):
            return self.function
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass
class Call:
    """A parsed command line: the verb and what to call it with."""

    verb: Verb
    kwargs: dict[str, Any]
    key_files: dict[str, str] = field(default_factory=dict)  # the CLI's global --key-file / --encrypt-key-file

    def __call__(self) -> Any:
        result = self.verb.load()(**self.kwargs)
        done = self.verb.done
        if isinstance(done, str) and re.fullmatch(r"[\w.]+:\w+", done):  # "module:function"
            module, _, name = done.partition(":")
            done = getattr(importlib.import_module(module), name)
        if callable(done):
            done = done(result, self.kwargs)
        elif done:
            done = done.format(result=result, **self.kwargs)
        if done:
            print(done)
        return result


# ----------------------------------------------------------------------------------------------
# argparse with one-line errors


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line, `lmforge VERB: error: ...`, and exits with code 2."""

    def __init__(self, *args: Any, label: str = "lmforge", **kwargs: Any) -> None:
        # no abbreviated flags: `--conf` would escape the look for --config before the parser is built
        super().__init__(*args, formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)
        self.label = label

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.label}: error: {' '.join(message.split())}\n")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [s for a in self._actions for s in a.option_strings]
            unknown = next((e for e in extras if e.startswith("-")), extras[0])
            close = difflib.get_close_matches(unknown.split("=")[0], flags, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; see {self.prog} --help"
            self.error(f"unrecognized argument {unknown!r}{hint}")
        return namespace


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description on its own; wider columns for long flag names."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(super(HelpFormatter, self)._fill_text(p, width, indent) for p in text.split("\n\n"))


# ----------------------------------------------------------------------------------------------
# docstrings


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {parameter: help}) of a docstring whose parameters are listed under "Args:".

    An entry is `name: text` at the section's indentation; more indented lines continue it.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    if "Args:" not in lines:
        return "\n".join(lines).strip(), {}
    start = lines.index("Args:")
    helps: dict[str, str] = {}
    indent, name = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the next section (Returns:, a paragraph)
            break
        match = re.match(r"(\w+)(?: \([^)]*\))?: ?(.*)", line.strip())
        if indent is None or depth == indent and match:
            indent = depth
            name, text = match.groups() if match else (None, "")
            if name:
                helps[name] = text.strip()
        elif name:
            helps[name] += " " + line.strip()
    return "\n".join(lines[:start]).strip(), helps


def first_line(text: str) -> str:
    return text.strip().split("\n\n")[0].replace("\n", " ").strip()


@functools.cache
def _module_tree(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return None


def summary(verb: Verb) -> str:
    """The verb's line in `lmforge --help`: its `help`, or the first line of its function's docstring,
    read from the source without importing the module (which would import torch)."""
    if verb.help or not verb.function:
        return verb.help
    if callable(verb.function):
        return first_line(parse_docstring(verb.function.__doc__)[0])
    module, _, name = verb.function.partition(":")
    package = Path(__file__).parent
    tree = _module_tree(package.joinpath(*module.split(".")[1:]).with_suffix(".py"))
    for node in tree.body if tree else []:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return first_line(parse_docstring(ast.get_docstring(node))[0])
    return ""


# ----------------------------------------------------------------------------------------------
# types: what a flag's text or a YAML value means for an annotation


# ----------------------------------------------------------------------------------------------
# a parser from a function


@dataclass
class Param:
    """A parameter as the command line offers it."""

    name: str
    type: Any
    default: Any  # inspect.Parameter.empty where the function has none
    help: str
    positional: bool
    required: bool

    @property
    def section(self) -> type | None:
        """The dataclass of a `clean: CleanConfig | bool` parameter."""
        return next((m for m in union_members(self.type) if is_config_type(m)), None)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def verb_params(verb: Verb, fn: Callable[..., Any]) -> list[Param]:
    """The parameters of `fn` the command line offers, with their types and help."""
    _, helps = parse_docstring(fn.__doc__)
    unknown = set(verb.required + verb.positional + verb.hide) | set(verb.fixed)
    params = []
    for p in inspect.signature(fn).parameters.values():
        unknown.discard(p.name)
        if p.name in verb.hide or p.name in verb.fixed or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name == "overrides" and getattr(fn, "settings", None):
            continue  # filled by the sections' flags
        if p.name in RESERVED:
            raise TypeError(f"{verb.function}: parameter {p.name!r} clashes with --{p.name.replace('_', '-')}; "
                            f"the verb's YAML comes through the generated --config")
        if p.name not in helps:
            raise TypeError(f"{verb.function}: parameter {p.name!r} has no entry under Args: in the docstring")
        annotation = p.annotation
        if isinstance(annotation, str):  # `from __future__ import annotations`
            annotation = eval(annotation, fn.__globals__)  # the module's own annotation
        elif annotation is inspect.Parameter.empty:
            annotation = Any
        if p.name in verb.positional and p.default is p.empty:
            raise TypeError(f"{verb.function}: {p.name!r} is an optional positional argument but has no default")
        positional = p.name in verb.positional or (p.default is p.empty and p.name not in verb.required)
        required = p.name in verb.required or (p.default is p.empty and p.name not in verb.positional)
        params.append(Param(p.name, annotation, p.default, helps[p.name], positional, required))
    if unknown:
        raise TypeError(f"{verb.function} has no parameter(s) {', '.join(sorted(unknown))} named by its Verb")
    return params


def _help(text: str, default: Any = None) -> str:
    """`text` with "(default: X)" added where X says something, escaped for argparse."""
    nothing = default is None or default is False or default is inspect.Parameter.empty or \
        isinstance(default, (str, list, tuple)) and not default or dataclasses.is_dataclass(default)
    if not nothing and "default" not in text:
        shown = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        text += f" (default: {shown!r})" if "\n" in shown or shown != shown.strip() else f" (default: {shown})"
    return text.replace("%", "%%")


def _metavar(p: Param) -> str:
    base = next((m for m in union_members(p.type) if m is not NoneType), Any)
    if is_list_type(base):
        base = next((a for a in typing.get_args(base) if a is not Ellipsis), Any)
    if typing.get_origin(base) is Literal:
        return "{" + ",".join(map(str, typing.get_args(base))) + "}"
    return {int: "N", float: "X"}.get(base, p.name.upper())


def add_section(parser: argparse.ArgumentParser, name: str, cls: type, title: str | None = None,
                description: str | None = None, flat: bool = False, defaults: Any = None) -> Any:
    """`--NAME.FIELD VALUE` for each field of dataclass `cls` (and `--FIELD-NAME` with `flat`), each with its
    help and default (the field's, or `defaults`' where given), in an argument group that is returned;
    values land in the namespace as "NAME.FIELD" (read them with `given_sections`)."""
    group = parser.add_argument_group(title or f"{name} settings", description)
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name) if defaults is not None else f.default
        flags = [f"--{name}.{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if flat else [])
        if f.metadata.get("dotted"):
            flags.append(f"--{name}.{f.name.replace('_', '.', 1)}")
        group.add_argument(*flags, dest=f"{name}.{f.name}", metavar="VALUE", default=argparse.SUPPRESS,
                           help=_help(f.metadata.get("help", ""), default))
    return group


def given_sections(namespace: argparse.Namespace | dict[str, Any], sections: dict[str, type]) -> dict[str, Any]:
    """The "SECTION.FIELD" flags given in `namespace` as {"SECTION.FIELD": value}, each read as its field's type."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else namespace
    out = {}
    for key, text in values.items():
        section, _, name = key.partition(".")
        if section in sections and name:
            tp = typing.get_type_hints(sections[section])[name]
            out[key] = from_text(text, tp, f"--{key}", none_word=True)
    return out


def build_parser(verb: Verb, file_values: dict[str, Any] | None = None
                 ) -> tuple[Parser, Callable[..., Any], list[Param]]:
    """The parser of a declared verb: its parameters, sections, --config and --print-config.

    Parameters that `file_values` (a --config file's) gives are no longer required on the command line.
    """
    fn = verb.load()
    params = verb_params(verb, fn)
    description, _ = parse_docstring(fn.__doc__)
    parser = Parser(prog=f"lmforge {verb.name}", description=description, label=verb.label)
    file_values = file_values or {}
    aliases: dict[str, list[str]] = {}
    for flag, target in verb.aliases.items():
        aliases.setdefault(target, []).append(flag)
    sections = dict(getattr(fn, "settings", None) or {})
    for p in params:
        given = p.name in file_values
        if p.section is not None:
            default = p.default if is_config_type(type(p.default)) else None
            group = add_section(parser, p.name, p.section, description=_help(p.help), flat=p.name in verb.flat,
                                defaults=default)
            if bool in union_members(p.type):
                group.add_argument(f"--no-{p.name.replace('_', '-')}", dest=p.name, action="store_false",
                                   default=argparse.SUPPRESS, help=f"turn {p.name} off")
            continue
        many = is_list_type(next((m for m in union_members(p.type) if m is not NoneType), Any))
        if p.positional:
            nargs = ("*" if given or not p.required else "+") if many else ("?" if given or not p.required else None)
            parser.add_argument(p.name, nargs=nargs, default=argparse.SUPPRESS, metavar=p.name.upper(),
                                help=_help(p.help, p.default))
        elif p.type is bool:
            flag = p.flag if p.default is not True else f"--no-{p.name.replace('_', '-')}"
            parser.add_argument(flag, *aliases.get(p.name, []), dest=p.name, default=argparse.SUPPRESS,
                                action="store_false" if p.default is True else "store_true", help=_help(p.help))
        else:
            parser.add_argument(p.flag, *aliases.get(p.name, []), dest=p.name, default=argparse.SUPPRESS,
                                required=p.required and not given, metavar=_metavar(p),
                                nargs="+" if many else None, action="extend" if many else "store",
                                help=_help(p.help, p.default))
    for name, cls in sections.items():
        add_section(parser, name, cls, flat=name in verb.flat)
    all_sections = {**sections, **{p.name: p.section for p in params if p.section is not None}}
    fields = {f"{name}.{f.name}" for name, cls in all_sections.items() for f in dataclasses.fields(cls)}
    for flag, target in verb.aliases.items():
        if target in fields:  # an older spelling of a section's flag
            parser.add_argument(flag, dest=target, metavar="VALUE", default=argparse.SUPPRESS,
                                help=f"the same as --{target}")
        elif target not in {p.name for p in params}:
            raise TypeError(f"{verb.function}: the alias {flag} names {target!r}, not an offered parameter or field")
    group = parser.add_argument_group("configuration")
    group.add_argument("--config", metavar="FILE", help="a YAML file of these settings: parameters by name, "
                       "sections (model:, train:, ...) as mappings; flags override it")
    group.add_argument("--print-config", action="store_true", help="print the resolved settings as a YAML "
                       "file that --config reads, and exit")
    short_usage(parser)
    return parser, fn, params


def short_usage(parser: argparse.ArgumentParser) -> None:
    """One `[--NAME.FIELD VALUE ...]` in the usage line for each section, instead of every field."""
    sections = list(dict.fromkeys(a.dest.partition(".")[0] for a in parser._actions if "." in a.dest))
    if not sections:
        return
    formatter = parser._get_formatter()
    plain = [a for a in parser._actions if "." not in a.dest]
    parts = [formatter._format_actions_usage([a for a in plain if a.option_strings], []),
             *(f"[--{name}.FIELD VALUE ...]" for name in sections),
             formatter._format_actions_usage([a for a in plain if not a.option_strings], [])]
    items: list[str] = []  # "[--top-k N]", "--data DATA", "CHECKPOINT": never split over two lines
    for word in re.findall(r"\[(?:[^\[\]]|\[[^\]]*\])*\]|\S+", " ".join(parts)):
        if items and items[-1].startswith("--") and " " not in items[-1] and word[0] not in "-[":
            items[-1] += " " + word  # a required flag's value
        else:
            items.append(word)
    lines, indent = [parser.prog], " " * (len(parser.prog) + 1)
    for item in items:
        if len(lines[-1]) + 1 + len(item) > formatter._width - len("usage: "):
            lines.append(indent + item)
        else:
            lines[-1] += " " + item
    parser.usage = "\n       ".join(lines).replace("%", "%%")


def read_config_file(path: str, verb: Verb, fn: Callable[..., Any], params: list[Param]) -> dict[str, Any]:
    """A --config file's values: {parameter: value} and {"SECTION.FIELD": value} for settings sections."""
    file = Path(path)
    doc = read_yaml(file)
    by_name = {p.name: p for p in params}
    sections = dict(getattr(fn, "settings", None) or {})
    values: dict[str, Any] = {}
    for key, value in doc.items():
        where = f"{file}: {key}"
        if key in sections:
            values.update({f"{key}.{k}": v for k, v in section_values(sections[key], value or {}, where).items()})
        elif key in by_name:
            p = by_name[key]
            if value is None and p.required:
                continue  # a template's blank: still required
            if p.section is not None and isinstance(value, dict):
                values[key] = section_values(p.section, value, where)  # merged with the flags' fields later
            else:
                values[key] = convert(value, p.type, where)
        else:
            raise UserError(f"{file}: unknown setting {key!r}{did_you_mean(key, [*by_name, *sections])}")
    return values


def resolve(verb: Verb, fn: Callable[..., Any], params: list[Param], file_values: dict[str, Any],
            namespace: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the call: defaults, then the file's values, then the flags'."""
    given = vars(namespace)
    kwargs: dict[str, Any] = {}
    for p in params:
        where = p.flag if not p.positional else p.name.upper()
        if p.section is not None:
            kwargs[p.name] = _resolve_section(p, file_values.get(p.name, inspect.Parameter.empty), given)
            continue
        if p.name in given:
            value = given[p.name]
            if isinstance(value, list):
                value = convert([from_text(v, _item_type(p.type), where) for v in value], p.type, where)
            elif isinstance(value, str):
                value = from_text(value, p.type, where)
        elif p.name in file_values:
            value = file_values[p.name]
        elif p.required:  # argparse checks the command line; this catches a --config file's gap
            raise UserError(f"the following arguments are required: {where}")
        else:
            value = p.default
        kwargs[p.name] = value
    sections = dict(getattr(fn, "settings", None) or {})
    if sections:
        overrides = {k: v for k, v in file_values.items() if k.partition(".")[0] in sections and "." in k}
        overrides.update(given_sections(given, sections))
        kwargs["overrides"] = overrides
    return kwargs


def _item_type(tp: Any) -> Any:
    base = next((m for m in union_members(tp) if m is not NoneType), Any)
    return next((a for a in typing.get_args(base) if a is not Ellipsis), Any) if is_list_type(base) else base


def _resolve_section(p: Param, from_file: Any, given: dict[str, Any]) -> Any:
    """A dataclass parameter's value: its default's fields, then the file's, then the `--NAME.FIELD` flags;
    or False from `--no-NAME` (or `NAME: false` in the file)."""
    cls = p.section
    flags = given_sections({k: v for k, v in given.items() if k.startswith(p.name + ".")}, {p.name: cls})
    fields = {k.partition(".")[2]: v for k, v in flags.items()}
    if given.get(p.name) is False:
        if fields:
            raise UserError(f"--no-{p.name.replace('_', '-')} and --{next(iter(flags))} contradict each other")
        return False
    value = p.default if from_file is inspect.Parameter.empty else from_file
    if isinstance(value, dict):  # the file's fields, over the default's
        default = p.default if is_config_type(type(p.default)) else cls()
        value = dataclasses.replace(default, **value)
    if value is True:
        value = cls()
    if value is False or value is None:
        return cls(**fields) if fields else value
    return dataclasses.replace(value, **fields) if fields else value


def printable(kwargs: dict[str, Any], verb: Verb, sections: Sequence[str] = ()) -> dict[str, Any]:
    """The resolved arguments as a YAML-ready mapping, the overrides nested by section, in the order of
    `sections` (what --print-config prints)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return str(value) if isinstance(value, Path) else value

    out = {k: plain(v) for k, v in kwargs.items() if k != "overrides" and k not in verb.fixed}
    overrides = kwargs.get("overrides") or {}
    for section in dict.fromkeys([*sections, *(dotted.partition(".")[0] for dotted in overrides)]):
        for dotted, value in overrides.items():
            if dotted.partition(".")[0] == section:
                out.setdefault(section, {})[dotted.partition(".")[2]] = plain(value)
    return out


def parse(verb: Verb, args: Sequence[str]) -> Call:
    """The call a verb's command line asks for; exits (code 2, one line) on a mistake, or after printing
    the help or the resolved config."""
    pre = Parser(add_help=False, label=verb.label)
    pre.add_argument("--config")
    config_file = pre.parse_known_args(args)[0].config
    parser, fn, params = build_parser(verb)
    try:
        file_values = read_config_file(config_file, verb, fn, params) if config_file else {}
        if file_values:  # what the file gives is no longer required on the command line
            parser, fn, params = build_parser(verb, file_values)
        namespace = parser.parse_args(args)
        kwargs = resolve(verb, fn, params, file_values, namespace)
    except UserError as e:
        parser.error(str(e))
    if namespace.print_config:
        import yaml

        sections = list(getattr(fn, "settings", None) or {})
        sys.stdout.write(yaml.safe_dump(printable(kwargs, verb, sections), sort_keys=False, allow_unicode=True))
        parser.exit(0)
    return Call(verb, {**verb.fixed, **kwargs})
