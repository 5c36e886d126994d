"""One readable line for a pydantic error of a strict (``extra="forbid"``) config: the key's
dotted path, and for an unknown key the closest valid key at that level.

Shared by the YAML configs (`splice train`, `splice bench`): `StrictConfig` and
`parse_config`."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from splice.errors import SpliceError
from splice.numbers import FINITE


def model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel]:
    """The config class that holds the key at ``loc`` (nested models followed by name)."""
    cls = root
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        sub = getattr(field, "annotation", None) if field else None
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            cls = sub
        else:
            break
    return cls


def first_error(e: ValidationError) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The error to report (a typo'd key first: it usually explains a missing one) and its
    location without the union-branch tags pydantic inserts (``literal['core','all']``)."""
    err = dict(sorted(e.errors(), key=lambda x: x["type"] != "extra_forbidden")[0])
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    err["msg"] = str(err["msg"]).removeprefix("Value error, ")  # a validator's own message
    return loc, err


def did_you_mean(word: str, choices: Iterable[str], sep: str = " ") -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to ``word`` (difflib's
    ratio >= 0.6), or "" when none is close: the one "did you mean" of every splice error.
    ``sep="; "`` gives ``"; did you mean 'x'?"`` for messages that go on in parentheses."""
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    if not close:
        return ""
    return f" (did you mean '{close[0]}'?)" if sep == " " else f"{sep}did you mean '{close[0]}'?"


def unknown_key_message(root: type[BaseModel], loc: tuple[Any, ...], list_valid: bool) -> str:
    """'unknown key (did you mean ...?)' [+ '; valid keys here: ...']."""
    fields = list(model_at(root, loc).model_fields)
    msg = "unknown key" + did_you_mean(str(loc[-1]), fields)
    if list_valid:
        msg += f"; valid keys here: {', '.join(fields)}"
    return msg


ConfigT = TypeVar("ConfigT", bound=BaseModel)


class StrictConfig(BaseModel):
    """A frozen config section; unknown keys and NaN / ±inf numbers (YAML .nan / .inf, or
    flags) are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, **FINITE)


def parse_config(
    cls: type[ConfigT],
    data: Any,
    where: str,
    error: type[SpliceError],
    *,
    list_valid: bool,
    messages: dict[str, str] | None = None,
) -> ConfigT:
    """``cls(**data)``, or ``error("WHERE: 'dotted.key': message")`` for the first problem:
    an unknown key names the closest valid one (``list_valid``: and all valid keys there);
    ``messages`` replaces pydantic's message for the keys it names."""
    if not isinstance(data, dict):
        raise error(f"{where}: expected a mapping at the top level")
    try:
        return cls(**data)
    except ValidationError as e:
        loc, err = first_error(e)
        path = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            msg = unknown_key_message(cls, loc, list_valid=list_valid)
        else:
            msg = (messages or {}).get(path, err["msg"])
        raise error(f"{where}: '{path}': {msg}") from None


def named_paths(items: Iterable[str], flag: str, error: type[SpliceError]) -> dict[str, str]:
    """Repeated ``FLAG NAME=PATH`` values as {name: path} (the first ``=`` splits, so a path may
    hold one); a missing part or a repeated name is a one-line ``error``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise error(f"{flag} {item!r}: expected NAME=PATH")
        if name in out:
            raise error(f"{flag} {name!r} given twice")
        out[name] = path
    return out
