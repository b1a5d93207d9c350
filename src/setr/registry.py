"""Name -> class / builder tables: one type for every table a config names an entry of.

Decode heads, necks (:mod:`setr.models.registry`), encoders (:data:`setr.models.encoders.ENCODERS`), norm layers
(:data:`setr.models.norm.NORM_LAYERS`) and datasets (:data:`setr.data.registry.DATASETS`) are all a
:class:`Registry`, so a new entry is one ``@TABLE.register("name")`` away from the config, a taken name raises at
import time (two entries silently shadowing each other would build the wrong thing), and an unknown name is the
same one :class:`setr.errors.SETRConfigError` line everywhere: the config key, the name, and the choices.

This module is on the ground floor (it imports only :mod:`setr.errors`), so ``setr.data`` and ``setr.models`` both
use it without one importing the other.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from setr.errors import SETRConfigError

T = TypeVar("T")
_MISSING = object()


@dataclass
class _Entry(Generic[T]):
    value: T
    keys: tuple[str, ...]  # config keys a builder takes (besides ``type``); empty for a plain value
    ignored: frozenset[str] = field(default_factory=frozenset)  # config keys accepted and dropped


class Registry(Mapping[str, T]):
    """One kind of entry (``head type``, ``dataset``, ...): name -> class, builder or value, in registration order.

    It reads like a dict of the registered values (``name in TABLE``, ``TABLE[name]``, ``TABLE.get(name)``,
    iteration over the names). ``kind`` names the entries in messages; ``context``: constructor arguments the
    caller always supplies, so a config never sets them (not listed as config keys by :meth:`build`);
    ``sort_choices``: list the choices of an unknown name alphabetically instead of in registration order."""

    def __init__(self, kind: str, context: Iterable[str] = (), sort_choices: bool = False) -> None:
        self.kind = kind
        self.context = tuple(context)
        self.sort_choices = sort_choices
        self._entries: dict[str, _Entry[T]] = {}

    # ------------------------------------------------------------------------------------ registration
    def register(self, name: str, ignore: Iterable[str] = ()) -> Callable[[T], T]:
        """Decorator: make ``name`` available. ``ignore``: config keys this type accepts without using them
        (e.g. a model preset's conv widths, meaningless to a 1x1 classifier that may replace its head)."""

        def deco(value: T) -> T:
            return self.add(name, value, ignore)

        return deco

    def add(self, name: str, value: T, ignore: Iterable[str] = ()) -> T:
        """Register ``value`` under ``name`` and return it. The same value again is harmless (a module imported
        twice); another value under a taken name raises ``ValueError``."""
        old = self._entries.get(name)
        if old is not None and old.value is not value:
            raise ValueError(f"{self.kind} {name!r} is already registered by {_label(old.value)}")
        keys: tuple[str, ...] = ()
        if callable(value):
            try:
                params = inspect.signature(value).parameters.values()
            except (TypeError, ValueError):  # a builtin without a signature: no keys to offer
                params = ()  # type: ignore[assignment]
            keys = tuple(p.name for p in params
                         if p.name not in self.context and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        self._entries[name] = _Entry(value, keys, frozenset(ignore))
        return value

    def unregister(self, name: str) -> T | None:
        """Remove ``name`` (tests, plugins); its value, or None when it was not registered."""
        entry = self._entries.pop(name, None)
        return None if entry is None else entry.value

    def pop(self, name: str, default: Any = _MISSING) -> Any:
        """dict-style removal: ``name``'s value; ``default`` (or ``KeyError`` without one) when it is not there."""
        if name not in self._entries:
            if default is _MISSING:
                raise KeyError(name)
            return default
        return self.unregister(name)

    # ------------------------------------------------------------------------------------------ lookup
    def names(self) -> list[str]:
        return list(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[name].value

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    def choices(self) -> str:
        """The names as a message lists them."""
        names = sorted(self._entries) if self.sort_choices else list(self._entries)
        return ", ".join(names)

    def lookup(self, name: Any, key: str) -> T:
        """The value registered as ``name``, which the config key ``key`` gave; one line naming ``key``, the
        name and the choices when there is none."""
        try:
            return self._entries[name].value
        except (KeyError, TypeError):  # TypeError: an unhashable config value (a list) is no name either
            raise SETRConfigError(f"{key}: unknown {self.kind} {name!r}; choose one of {self.choices()}") from None

    def build(self, spec: Mapping[str, Any], key: str, default_type: str, **context: Any) -> Any:
        """Build the entry the config node ``spec`` (at ``key``) describes: its ``type`` (``default_type`` when
        absent) names the builder, its other keys are the builder's arguments. ``context`` holds the arguments
        the caller supplies (one set per call, e.g. ``in_index`` of an auxiliary head); they win over ``spec``.
        Only the context arguments the builder's signature names are passed."""
        spec = dict(spec)
        name = spec.pop("type", default_type)
        builder = self.lookup(name, f"{key}.type")
        entry = self._entries[name]
        unknown = sorted(set(spec) - set(entry.keys) - entry.ignored)
        if unknown:
            raise SETRConfigError(f"{key}: unknown key(s) {unknown}; allowed for type {name!r}: "
                                  f"type, {', '.join(entry.keys)}")
        kwargs = {k: v for k, v in spec.items() if k not in entry.ignored}
        accepted = set(inspect.signature(builder).parameters)
        kwargs.update({k: v for k, v in context.items() if k in accepted})
        try:
            return builder(**kwargs)
        except (TypeError, ValueError) as e:
            # builders start messages about one argument with its name ("in_index: ..."): name the config key
            arg, sep, rest = str(e).partition(": ")
            if sep and arg in entry.keys:
                raise SETRConfigError(f"{key}.{arg}: {rest}") from e
            raise SETRConfigError(f"{key}: {e}") from e


def _label(value: Any) -> str:
    return getattr(value, "__qualname__", None) or repr(value)
