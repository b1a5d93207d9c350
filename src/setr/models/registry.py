"""Type name -> builder tables for the decoder parts, so :func:`setr.models.build_setr` has no if/elif per type.

As in mmsegmentation, decode and auxiliary heads come from one table (:data:`HEADS`: any head may serve as
either) and necks from another (:data:`NECKS`); a config names a part by ``type``. A new part is one
``@HEADS.register("name")`` on its class away from the config: its constructor's keyword arguments become the
config keys it accepts, minus the ones the model supplies (:data:`CONTEXT`: input width, classes, norm layer).
Every mistake becomes one :class:`setr.errors.SETRConfigError` line naming the config key.

What the model expects of a part: a head has an ``in_index`` attribute (a position, or a list of positions, in
the maps that feed the heads) and maps those inputs to logits; a neck has ``num_levels`` (it is built with one
per encoder map) and ``out_channels`` (the width of the levels it returns to the heads).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from setr.errors import SETRConfigError

# constructor arguments the model fills in; configs never set them
CONTEXT = ("in_channels", "num_classes", "norm", "num_levels")


@dataclass
class _Entry:
    builder: Callable[..., nn.Module]
    keys: tuple[str, ...]  # config keys it takes (besides ``type``)
    ignored: frozenset[str] = field(default_factory=frozenset)  # config keys accepted and dropped


class Registry:
    """One kind of part (``head``, ``neck``): ``type`` name -> builder, in registration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, ignore: Iterable[str] = ()) -> Callable:
        """Class decorator: make ``name`` buildable. ``ignore``: config keys this type accepts without using them
        (e.g. a model preset's conv widths, meaningless to a 1x1 classifier that may replace its head)."""

        def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
            if name in self._entries:
                raise ValueError(f"{self.kind} type {name!r} is already registered")
            params = inspect.signature(builder).parameters.values()
            keys = tuple(p.name for p in params
                         if p.name not in CONTEXT and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
            self._entries[name] = _Entry(builder, keys, frozenset(ignore))
            return builder

        return deco

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)

    def build(self, spec: Mapping[str, Any], key: str, default_type: str, **context: Any) -> nn.Module:
        """Build the part ``spec`` describes (config node ``key``). ``context`` holds the arguments the model
        supplies (:data:`CONTEXT`, and ``in_index`` for auxiliary heads, one per head); they win over ``spec``.
        Only the context arguments the builder's signature names are passed."""
        spec = dict(spec)
        name = spec.pop("type", default_type)
        if name not in self._entries:
            raise SETRConfigError(f"{key}.type: unknown {self.kind} type {name!r}; choose one of "
                                  f"{', '.join(self._entries)}")
        entry = self._entries[name]
        unknown = sorted(set(spec) - set(entry.keys) - entry.ignored)
        if unknown:
            raise SETRConfigError(f"{key}: unknown key(s) {unknown}; allowed for type {name!r}: "
                                  f"type, {', '.join(entry.keys)}")
        kwargs = {k: v for k, v in spec.items() if k not in entry.ignored}
        accepted = set(inspect.signature(entry.builder).parameters)
        kwargs.update({k: v for k, v in context.items() if k in accepted})
        try:
            return entry.builder(**kwargs)
        except (TypeError, ValueError) as e:
            # builders start messages about one argument with its name ("in_index: ..."): name the config key
            arg, sep, rest = str(e).partition(": ")
            if sep and arg in entry.keys:
                raise SETRConfigError(f"{key}.{arg}: {rest}") from e
            raise SETRConfigError(f"{key}: {e}") from e


HEADS = Registry("head")
NECKS = Registry("neck")
