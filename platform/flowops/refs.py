"""References to registered model versions, parsed once and printed once.

A model version travels as `models:/<name>/<N>`, `models:/<name>@<alias>`, a bare number or a bare
alias. Everything else in FlowOps holds a `ModelRef`, and this is the only module that builds a
`models:/` string. (Data versions, `vN` or `latest`, are resolved once by `data.open_version`.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flowops.errors import InvalidInput

PRODUCTION, STAGING = "production", "staging"

_NAME = r"[A-Za-z0-9][\w.-]*"
_ALIAS = r"[A-Za-z][\w-]*"
_URI = re.compile(rf"^models:/(?P<name>{_NAME})(?:/(?P<version>\d+)|@(?P<alias>{_ALIAS}))$")
_BARE = re.compile(rf"^(?:(?P<version>\d+)|@?(?P<alias>{_ALIAS}))$")


def model_ref_pattern(name: str | None = None) -> str:
    """The references `ModelRef.parse(text, default_name)` reads, as a regular expression in the
    ASCII subset that JSON Schema (ECMA-262), Python and pydantic read alike: a number, an alias,
    or a models:/ URI (of the model `name` when given, else of any model)."""
    alias = "[A-Za-z][A-Za-z0-9_-]*"
    if name:  # punctuation as \xNN: an escape ECMA-262, Python and Rust regexes all read
        model = "".join(c if c.isalnum() or c == "_" or ord(c) > 127 else f"\\x{ord(c):02x}"
                        for c in name)
    else:
        model = "[A-Za-z0-9][A-Za-z0-9_.-]*"
    return rf"^(?:[0-9]+|@?{alias}|models:/{model}(?:/[0-9]+|@{alias}))$"


@dataclass(frozen=True)
class ModelRef:
    """One registered model version, by number or by alias (exactly one of the two)."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __post_init__(self) -> None:
        if (self.version is None) == (self.alias is None):
            raise InvalidInput(f"a model reference needs a version or an alias, not both: {self!r}")

    @classmethod
    def parse(cls, text: str | int, default_name: str | None = None) -> ModelRef:
        """`models:/name/3`, `models:/name@production`, or (with `default_name`) `3` / `production`."""
        raw = str(text).strip()
        match = _URI.match(raw)
        if match:
            return cls(match["name"], match["version"], match["alias"])
        match = _BARE.match(raw) if default_name else None
        if match:
            return cls(default_name, match["version"], match["alias"])
        allowed = "models:/<name>/<version> or models:/<name>@<alias>"
        if default_name:
            allowed += ", a version number or an alias"
        raise InvalidInput(f"model reference {raw!r} is not of the form {allowed}")

    @classmethod
    def of(cls, name: str, version: str | int) -> ModelRef:
        """A numbered version."""
        return cls(name, str(version))

    @classmethod
    def production(cls, name: str) -> ModelRef:
        return cls(name, alias=PRODUCTION)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else f"models:/{self.name}@{self.alias}"

    def number(self) -> str:
        """The version number; InvalidInput when this reference is an alias."""
        if self.version is None:
            raise InvalidInput(f"name a version number, not an alias ({self.uri})")
        return self.version

    def __str__(self) -> str:
        return self.uri


def version_number(text: str | int, name: str | None = None) -> str:
    """A model version number from `3` or `models:/name/3`; InvalidInput otherwise."""
    raw = str(text).strip()
    if raw.isdigit():
        return raw
    if raw.startswith("models:/"):
        return ModelRef.parse(raw).number()
    raise InvalidInput(f"model version must be a number (e.g. 3), got {text!r}")
