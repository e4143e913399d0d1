"""One line for a config that LightningCLI rejects: jsonargparse reports a misspelled key as the innermost line of
a nested message (a Union's subtypes, the given values, the usage of every option), so the field path, the config
file that holds the key and the nearest allowed name are recovered from that message here.

Examples of what the user sees::

    moe-lightning: error: topk.yaml: model.init_args.config: unknown key 'num_expert'; did you mean 'num_experts'?
    moe-lightning: error: topk.yaml: model.init_args.config.top_k: Expected a <class 'int'>. Got value: two
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import inspect
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

_UNKNOWN = (
    re.compile(r"Subcommand '[^']+' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Group '(?P<group>[^']+)' does not accept option '(?P<key>[^']+)'"),
    re.compile(r"Option '(?P<key>[^']+)' is not accepted"),
    re.compile(r"[Uu]nrecognized arguments: (?P<args>.+)"),
)
_PARSER_KEY = re.compile(r'^Parser key "(?P<key>[^"]+)":\s*(?P<rest>.*)$')
_CLASS_PATH = re.compile(r"^Problem with given class_path '(?P<path>[^']+)':$")
# jsonargparse's scaffolding around the error itself: never the line that names the problem.
_SCAFFOLD = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value|Expected a <class "
    r"'NoneType'>|Not a valid subclass of |Subclass types expect one of:|a class path \(str\)|a dict with|a dict "
    r"without)"
)
# Allowed names are listed in full only when they fit on the line; otherwise --help lists them.
_MAX_LISTED = 12


@dataclasses.dataclass
class _Line:
    indent: int
    text: str


def _lines(message: str) -> list[_Line]:
    lines = []
    for raw in message.splitlines():
        text = raw.strip()
        if text:
            lines.append(_Line(len(raw) - len(raw.lstrip()), text.removeprefix("- ")))
    return lines


def _ancestors(lines: list[_Line], index: int) -> list[_Line]:
    """The lines enclosing ``lines[index]`` (less indented and above it), outermost first."""
    chain, indent = [], lines[index].indent
    for line in reversed(lines[:index]):
        if line.indent < indent:
            chain.append(line)
            indent = line.indent
    return chain[::-1]


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _init_names(cls: Any) -> list[str]:
    """The keyword names a class takes: a dataclass's fields, or its ``__init__``'s named parameters, followed
    through the base classes while ``**kwargs`` passes the rest on (as jsonargparse resolves them)."""
    if cls is None:
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    names: list[str] = []
    for klass in getattr(cls, "__mro__", ()):
        if "__init__" not in vars(klass):
            continue
        try:
            parameters = list(inspect.signature(klass.__init__).parameters.values())[1:]
        except (TypeError, ValueError):
            break
        names += [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def _field_path(chain: list[_Line]) -> tuple[str, Any]:
    """``(the dotted field path, the innermost class)`` of a nested jsonargparse error: each ``Parser key`` adds
    its key, each class ``init_args``, except a dataclass (a dataclass config is written as a plain mapping)."""
    parts: list[str] = []
    cls = None
    for line in chain:
        key, class_path = _PARSER_KEY.match(line.text), _CLASS_PATH.match(line.text)
        if key:
            parts.append(key["key"])
        elif class_path:
            cls = _import(class_path["path"])
            if not dataclasses.is_dataclass(cls):
                parts.append("init_args")
    return ".".join(parts), cls


def _suggestion(key: str, allowed: Iterable[str], prefix: str = "") -> str:
    """``"; did you mean 'k'?"`` for the allowed name nearest to ``key`` (difflib), else the allowed names when they
    are few; each name shown with ``prefix`` (``--trainer.`` for an option)."""
    names = sorted({name for name in allowed if name and not name.startswith("_")})
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    if names and len(names) <= _MAX_LISTED:
        return f"; allowed: {', '.join(prefix + name for name in names)}"
    return ""


def _level_names(option_names: Sequence[str], parent: str) -> list[str]:
    """The next key after ``parent`` (``""`` for the top level) of every option of the parser."""
    prefix = f"{parent}." if parent else ""
    return [name[len(prefix) :].split(".")[0] for name in option_names if name.startswith(prefix)]


def _index_in_list(lines: list[_Line], key: str, class_path: str | None) -> str:
    """``[i]`` for the element of a list value (``trainer.callbacks``) that holds ``key``, read from the
    ``Given value`` line that jsonargparse prints under the list's ``Parser key``; ``""`` when it cannot be told."""
    given = next((line.text for line in lines if line.text.startswith("Given value: [")), None)
    if given is None or class_path is None:
        return ""
    try:
        value = ast.literal_eval(given.removeprefix("Given value: "))
    except (ValueError, SyntaxError):
        return ""
    for index, item in enumerate(value):
        if isinstance(item, dict) and item.get("class_path") == class_path and key in (item.get("init_args") or {}):
            return f"[{index}]"
    return ""


def _where(path: str, config_files: Sequence[str]) -> str:
    """``"<file>: "`` for the last config file whose mapping holds the dotted ``path`` (list elements searched,
    ``[i]`` indices followed), else ``""`` (the key came from the command line)."""
    for file in reversed(config_files):
        try:
            data = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if _holds(data, [part for part in re.split(r"\.|(?=\[)", path) if part]):
            return f"{file}: "
    return ""


def _holds(data: Any, parts: list[str]) -> bool:
    if not parts:
        return True
    head, rest = parts[0], parts[1:]
    if isinstance(data, list):
        index = re.fullmatch(r"\[(\d+)\]", head)
        if index:
            position = int(index[1])
            return position < len(data) and _holds(data[position], rest)
        return any(_holds(item, parts) for item in data)
    return isinstance(data, dict) and head in data and _holds(data[head], rest)


def config_files(args: Sequence[str]) -> list[str]:
    """The files given with ``--config``/``-c`` in ``args``, in order."""
    files, words = [], list(args)
    for position, word in enumerate(words):
        if word in ("--config", "-c") and position + 1 < len(words):
            files.append(words[position + 1])
        elif word.startswith("--config="):
            files.append(word.split("=", 1)[1])
        elif word.startswith("-c") and not word.startswith("--") and len(word) > 2:
            files.append(word[2:])
    return files


def describe_parse_error(message: str, option_names: Sequence[str], args: Sequence[str]) -> str:
    """The line that names what was wrong with a config rejected by jsonargparse.

    Args:
        message: the jsonargparse error message (``str`` of its ``ArgumentError``).
        option_names: every option of the subcommand's parser, dotted (``trainer.max_epochs``): the allowed keys.
        args: the command line, where the config files are found.

    Returns:
        ``"<file>: <field path>: unknown key 'k'; did you mean 'key'?"`` for a misspelled key; for another error, its
        innermost line with the field path; the message's first line when neither can be found.
    """
    lines = _lines(message)
    files = config_files(args)
    for index, line in enumerate(lines):
        for pattern in _UNKNOWN:
            match = pattern.search(line.text)
            if match is None:
                continue
            if "args" in match.groupdict():
                return _unknown_option(match["args"], option_names)
            chain = _ancestors(lines, index)
            return _unknown_key(match, chain, lines, option_names, files)
    return _innermost(lines, files) if lines else message


def _unknown_option(words: str, option_names: Sequence[str]) -> str:
    option = words.split()[0].split("=")[0]
    parent, _, key = option.removeprefix("--").rpartition(".")
    prefix = f"--{parent}." if parent else "--"
    return f"unknown option {option!r}{_suggestion(key, _level_names(option_names, parent), prefix)}"


def _unknown_key(
    match: re.Match, chain: list[_Line], lines: list[_Line], option_names: Sequence[str], files: Sequence[str]
) -> str:
    key = match["key"]
    if chain:
        path, cls = _field_path(chain)
        class_path = next((m["path"] for m in map(_CLASS_PATH.match, (c.text for c in chain)) if m), None)
        head, found, tail = path.partition(".init_args")
        path = head + _index_in_list(lines, key, class_path) + found + tail
        allowed = _init_names(cls)
    else:
        path = ".".join(filter(None, [match.groupdict().get("group"), *key.split(".")[:-1]]))
        key = key.split(".")[-1]
        allowed = _level_names(option_names, path)
    where = _where(f"{path}.{key}" if path else key, files)
    return f"{where}{path + ': ' if path else ''}unknown key {key!r}{_suggestion(key, allowed)}"


def _names_problem(text: str) -> bool:
    """False for jsonargparse's scaffolding: a class, a bare ``Parser key "k":``, the Union's listings."""
    key = _PARSER_KEY.match(text)
    return not (_SCAFFOLD.match(text) or _CLASS_PATH.match(text) or (key and not key["rest"]))


def _innermost(lines: list[_Line], files: Sequence[str]) -> str:
    """The most indented line that is not jsonargparse's scaffolding, with the field path above it."""
    candidates = [i for i, line in enumerate(lines) if _names_problem(line.text)]
    if not candidates:
        return lines[0].text
    index = max(candidates, key=lambda i: lines[i].indent)
    line = lines[index]
    own = _PARSER_KEY.match(line.text)
    chain = _ancestors(lines, index) + ([line] if own else [])
    path, _ = _field_path(chain)
    text = own["rest"] if own else line.text
    where = _where(path, files) if path else ""
    return f"{where}{path}: {text}" if path else text
