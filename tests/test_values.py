"""The ground-floor checks (setr.values) and the one table type (setr.registry): one line naming the key."""

import pytest
import torch

from setr.errors import SETRConfigError
from setr.registry import Registry
from setr.values import positive_int, resolve_device, size_pair


def test_size_pair_reads_an_int_or_a_pair_and_names_the_key():
    assert size_pair(8, "k") == (8, 8)
    assert size_pair([4, 6], "k") == (4, 6)
    with pytest.raises(SETRConfigError, match=r"^crop: expected a size or \[height, width\], got \[1, 2, 3\]$"):
        size_pair([1, 2, 3], "crop")
    with pytest.raises(SETRConfigError, match=r"^k: expected a size or \[height, width\], got True$"):
        size_pair(True, "k")  # a bool is not a size
    with pytest.raises(SETRConfigError, match=r"^k: sizes must be positive, got \[0, 4\]$"):
        size_pair([0, 4], "k")


def test_positive_int_and_device_name_the_key():
    assert positive_int(3, "n") == 3 and positive_int(0, "n", 0) == 0
    for bad in (0, True, 2.0, "3"):
        with pytest.raises(SETRConfigError, match=r"^batch_size: expected an integer >= 1, got "):
            positive_int(bad, "batch_size")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(SETRConfigError, match=r"^bench.device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N$"):
        resolve_device("tpu", "bench.device")
    with pytest.raises(SETRConfigError, match=r"^device: unsupported device 'meta'"):
        resolve_device("meta")


def test_registry_is_a_read_only_table_with_one_line_errors():
    table: Registry = Registry("widget", sort_choices=True)

    @table.register("b")
    def make_b(width: int = 1) -> int:
        return width

    table.add("a", len)
    assert list(table) == ["b", "a"] and table["b"] is make_b and "a" in table and table.get("c") is None
    table.register("b")(make_b)  # the same builder again: harmless
    with pytest.raises(ValueError, match=r"^widget 'b' is already registered by .*make_b$"):
        table.add("b", len)
    with pytest.raises(SETRConfigError, match=r"^x.kind: unknown widget 'c'; choose one of a, b$"):
        table.lookup("c", "x.kind")
    with pytest.raises(SETRConfigError, match=r"^x.kind: unknown widget \['b'\]; choose one of a, b$"):
        table.lookup(["b"], "x.kind")  # a list from the config is no name (and no TypeError)
    assert table.build({"width": 3}, "x", "b") == 3
    with pytest.raises(SETRConfigError, match=r"^x: unknown key\(s\) \['depth'\]; allowed for type 'b': type, width$"):
        table.build({"depth": 3}, "x", "b")
    assert table.pop("a") is len and table.pop("a", None) is None and table.names() == ["b"]
