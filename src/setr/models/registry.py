"""Type name -> builder tables for the decoder parts, so :func:`setr.models.build_setr` has no if/elif per type.

As in mmsegmentation, decode and auxiliary heads come from one table (:data:`HEADS`: any head may serve as
either) and necks from another (:data:`NECKS`); a config names a part by ``type``. A new part is one
``@HEADS.register("name")`` on its class away from the config: its constructor's keyword arguments become the
config keys it accepts, minus the ones the model supplies (:data:`CONTEXT`: input width, classes, norm layer).
Every mistake becomes one :class:`setr.errors.SETRConfigError` line naming the config key.

The table type is :class:`setr.registry.Registry` (re-exported here), the one every name -> class table of the
project uses.

What the model expects of a part: a head has an ``in_index`` attribute (a position, or a list of positions, in
the maps that feed the heads) and maps those inputs to logits; a neck has ``num_levels`` (it is built with one
per encoder map) and ``out_channels`` (the width of the levels it returns to the heads).
"""

from __future__ import annotations

from torch import nn

from setr.registry import Registry

__all__ = ["CONTEXT", "HEADS", "NECKS", "Registry"]

# constructor arguments the model fills in; configs never set them
CONTEXT = ("in_channels", "num_classes", "norm", "num_levels")

HEADS: Registry[type[nn.Module]] = Registry("head type", context=CONTEXT)
NECKS: Registry[type[nn.Module]] = Registry("neck type", context=CONTEXT)
