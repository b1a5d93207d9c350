"""Config nodes as plain Python values: the ground floor under the record, the checks and the tasks (it imports
nothing of the project, so whatever reads a config can use it without an import circle)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(node: Any) -> Any:
    """A resolved plain-Python copy of an OmegaConf node (what a checkpoint may hold); other values unchanged."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
