"""The import graph (scripts/import_graph.py, read with ast): no module circles, and neither the
wire nor the tap reaching into the sidecar."""

from __future__ import annotations

from scripts.import_graph import cycles, forbidden, graph


def test_no_module_imports_itself_round_a_circle() -> None:
    assert cycles(graph()) == []


def test_wire_and_tap_import_no_service_module() -> None:
    edges = graph()
    assert forbidden(edges) == []
    assert "wire.codec" in edges and "tap.publisher" in edges  # the graph saw both parts
    assert "wire.codec" in edges["tap.publisher"]


def test_a_circle_and_a_forbidden_arrow_are_found() -> None:
    edges = {"wire.a": {"service.b"}, "service.b": {"service.c"}, "service.c": {"service.b"}}
    assert cycles(edges) == [["service.b", "service.c"]]
    assert forbidden(edges) == [("wire.a", "service.b")]
