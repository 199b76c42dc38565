"""The shared registry behind benchmarks, backbones and methods."""

import pytest

from lpft.data import benchmark_names
from lpft.registry import Registry


def test_register_lookup_and_sorted_names():
    reg: Registry[int] = Registry("widget")
    assert reg.register("b")(2) == 2
    reg.register("a")(1)
    assert "a" in reg and "c" not in reg
    assert reg["b"] == 2 and reg.names() == ["a", "b"]


def test_registering_a_name_twice_fails():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        reg.register("a")(2)


def test_bundled_benchmarks_are_registered():
    assert {"digits", "emoji-styles"} <= set(benchmark_names())
