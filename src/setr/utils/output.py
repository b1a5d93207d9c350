"""The entry points' output contract: metrics as ``metrics.json`` and as the final stdout line (one JSON object)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def collect_metrics(callback_metrics: Mapping[str, Any], prefixes=("train/", "val/", "test/")) -> dict[str, float]:
    """The scalar metrics Lightning logged under ``prefixes``, as floats, sorted by name."""
    out = {}
    for k, v in callback_metrics.items():
        if not k.startswith(prefixes):
            continue
        v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return dict(sorted(out.items()))


def write_metrics(metrics: Mapping[str, Any], output_dir: str | Path, name: str = "metrics.json") -> Path:
    path = Path(output_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, default=_json_default) + "\n")
    return path


def print_last_line(metrics: Mapping[str, Any]) -> None:
    """The entry points' contract: the final stdout line is one JSON object."""
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(metrics, default=_json_default), flush=True)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, float) and math.isnan(o):
        return None
    return str(o)
