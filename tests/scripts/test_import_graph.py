"""The import graph (scripts/import_graph.py, read with ast): no module or folder circles, and
every arrow between the product's packages pointing down the data flow's layers."""

from __future__ import annotations

from scripts.import_graph import cycles, forbidden, graph, package_graph


def test_no_module_imports_itself_round_a_circle() -> None:
    assert cycles(graph()) == []


def test_no_folder_imports_itself_round_a_circle() -> None:
    assert cycles(package_graph(graph())) == []


def test_arrows_point_down_the_layers() -> None:
    edges = graph()
    assert forbidden(edges) == []
    assert "wire.codec" in edges and "tap.publisher" in edges  # the graph saw both parts
    assert "wire.codec" in edges["tap.publisher"]
    assert "misalign_monitor.commands.sidecar" in edges["misalign_monitor.cli"]


def test_the_parts_hold_no_command_line_code() -> None:
    """Commands live in misalign_monitor/commands/; the parts are libraries (no click)."""
    import ast

    from scripts.import_graph import ROOT

    for part in ("detectors", "service", "review", "tap", "wire"):
        for path in (ROOT / part).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                assert not any(n.split(".")[0] == "click" for n in names), path


def test_a_circle_and_a_forbidden_arrow_are_found() -> None:
    edges = {"wire.a": {"service.b"}, "service.b": {"service.c"}, "service.c": {"service.b"}}
    assert cycles(edges) == [["service.b", "service.c"]]
    assert forbidden(edges) == [("wire.a", "service.b")]


def test_an_arrow_up_the_layers_or_into_the_tools_is_forbidden() -> None:
    edges = {
        "service.a": {"review.b", "tap.c"},
        "detectors.d": {"tests.support"},
        "tests.e": {"service.a"},
    }
    assert forbidden(edges) == [("detectors.d", "tests.support"), ("service.a", "review.b")]


def test_a_folder_circle_is_found_where_modules_form_none() -> None:
    edges = {"tests.a": {"tests.support.b"}, "tests.support.b": {"tests.c"}, "tests.c": set()}
    assert cycles(edges) == []
    assert cycles(package_graph(edges)) == [["tests", "tests.support"]]
