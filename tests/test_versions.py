"""The declared dependency floor is the one the code checks."""

from __future__ import annotations

import re
import tomllib

import pytest

import setr
from pipeline import ROOT
from setr.errors import SETRConfigError


def test_pyproject_torch_floor_is_the_checked_one():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if re.match(r"torch\b(?!vision|metrics)", d)]
    floor = re.search(r">=\s*([\d.]+)", torch_dep).group(1)
    assert tuple(int(x) for x in floor.split(".")[:2]) == setr.MIN_TORCH


def test_older_torch_is_one_line():
    setr.check_torch_version("2.6.0+cu124")
    setr.check_torch_version()  # the installed one
    with pytest.raises(SETRConfigError, match=r"torch 2\.4\.1 is installed; this project needs torch>=2\.6"):
        setr.check_torch_version("2.4.1")
