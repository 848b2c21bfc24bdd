"""
Every crash point has a cell: a test that kills a real process there.

:class:`securemig.crashpoint.CrashPoint` names every point the product defines.
A point no test kills at is a step whose crash nobody has checked, so this
test reads the test suite's sources (with :mod:`ast`, nothing is run) and
collects the names handed to the crash-point mechanism: a string literal (or
a ``CrashPoint.NAME`` member) in ``SECUREMIG_CRASH_AT`` (an environment
dict's value, comma-separated) or
passed to a function that ends there (``crash_env(point)``, and, found by
following the parameter, ``source_dies(point)``, ``destination_dies(point)``,
``cell(point, ...)`` and whatever helper comes next).

A point may go without a cell only if it is in :data:`EXEMPT`, with the
reason; an exemption must name a real point, so the list cannot rot.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig import crashpoint
from securemig.crashpoint import CrashPoint

#: Points with no cell, each with the honest reason why.
EXEMPT: dict[str, str] = {}

#: The test suite's root.
TESTS = Path(__file__).parent

#: The environment variable naming the points a process dies at.
VARIABLE = "SECUREMIG_CRASH_AT"
#: Functions known to hand their first argument to :data:`VARIABLE`.
SEEDS = {"crash_env": 0}


def _names(value: str) -> set[str]:
    """The points a value of :data:`VARIABLE` names (``NAME[,NAME...]``,
    each perhaps with a ``:mode`` suffix)."""
    return {part.split(":", 1)[0].strip() for part in value.split(",") if part.strip()}


def _called(call: ast.Call) -> str | None:
    """The name of the function ``call`` calls (``f(...)``, ``x.f(...)``)."""
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _params(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """Its positional parameters, without ``self``/``cls``."""
    names = [a.arg for a in (*function.args.posonlyargs, *function.args.args)]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return names


def _argument(call: ast.Call, index: int, param: str | None) -> ast.expr | None:
    """The expression ``call`` passes at position ``index`` (or by ``param``)."""
    if index < len(call.args) and not any(
        isinstance(a, ast.Starred) for a in call.args[: index + 1]
    ):
        return call.args[index]
    for keyword in call.keywords:
        if param is not None and keyword.arg == param:
            return keyword.value
    return None


def collect(sources: Iterable[str]) -> set[str]:
    """The crash-point names the test ``sources`` kill at."""
    trees = [ast.parse(source) for source in sources]
    functions: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                functions.setdefault(node.name, []).append(node)

    # sinks: function name -> (index of its point parameter, its name)
    sinks: dict[str, tuple[int, str | None]] = {name: (i, None) for name, i in SEEDS.items()}
    points: set[str] = set()

    def reach(value: ast.expr, enclosing: list[ast.FunctionDef | ast.AsyncFunctionDef]) -> bool:
        """Record what ``value`` names; True if a new sink was found."""
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            points.update(_names(value.value))
            return False
        if (
            isinstance(value, ast.Attribute)
            and isinstance(value.value, ast.Name)
            and value.value.id == CrashPoint.__name__
        ):
            # ``CrashPoint.NAME``: its value (an unknown member stays visible
            # as itself, and fails the check below).
            member = CrashPoint.__members__.get(value.attr)
            points.add(member.value if member is not None else f"CrashPoint.{value.attr}")
            return False
        if isinstance(value, ast.Name):
            for function in reversed(enclosing):
                params = _params(function)
                if value.id in params:
                    if function.name in sinks:
                        return False
                    sinks[function.name] = (params.index(value.id), value.id)
                    return True
                # A local name given a literal (``point = "..."``).
                for node in ast.walk(function):
                    if (
                        isinstance(node, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == value.id for t in node.targets)
                        and isinstance(node.value, ast.Constant)
                        and isinstance(node.value.value, str)
                    ):
                        points.update(_names(node.value.value))
        return False

    def visit(node: ast.AST, enclosing: list[ast.FunctionDef | ast.AsyncFunctionDef]) -> bool:
        grew = False
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            enclosing = [*enclosing, node]
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == VARIABLE:
                    grew |= reach(value, enclosing)
        if isinstance(node, ast.Call):
            name = _called(node)
            if name in sinks:
                index, param = sinks[name]
                argument = _argument(node, index, param)
                if argument is not None:
                    grew |= reach(argument, enclosing)
        for child in ast.iter_child_nodes(node):
            grew |= visit(child, enclosing)
        return grew

    while any([visit(tree, []) for tree in trees]):
        pass
    return points


def suite_sources() -> list[str]:
    """The test suite's sources (this file's exemptions are no cells)."""
    here = Path(__file__).resolve()
    return [p.read_text() for p in sorted(TESTS.rglob("*.py")) if p.resolve() != here]


class CrashPointCellTests(TestCase):
    def test_every_crash_point_has_a_cell(self) -> None:
        """Each ``CrashPoint`` is killed at by some test, or exempt with a
        reason; each exemption is still a real point."""
        points = {point.value for point in CrashPoint}
        killed = collect(suite_sources())
        self.assertEqual(killed - points, set(), "a test names a point the product lacks")
        self.assertEqual(set(EXEMPT) - points, set(), "an exemption names no point")
        self.assertTrue(all(reason.strip() for reason in EXEMPT.values()))
        missing = points - killed - set(EXEMPT)
        self.assertEqual(missing, set(), "crash points with no cell (add one, or exempt it)")

    def test_unknown_point_refused(self) -> None:
        """The product names a point by its member; a name that is no point
        raises ValueError (the ``assert`` this replaces raised
        AssertionError, and nothing at all under ``python -O``)."""
        self.assertRaises(ValueError, crashpoint.reached, "source-comitted")  # type: ignore[arg-type]
        crashpoint.reached(CrashPoint.SOURCE_COMMITTED)  # not armed here: nothing happens
        self.assertEqual(crashpoint.POINTS, frozenset(CrashPoint))

    def test_collector_finds_names(self) -> None:
        """The collector sees a literal in ``SECUREMIG_CRASH_AT``, in
        ``crash_env``, through helpers that forward their parameter, in a
        local name given a literal, and a ``CrashPoint`` member by its value
        (a member that does not exist as itself); not a string used otherwise."""
        sample = """
def crash_env(point):
    return {"SECUREMIG_CRASH_POINTS": "1", "SECUREMIG_CRASH_AT": point}

class Cells:
    def dies(self, where, point):
        return self.run(where, crash_env(point))

    def outer(self, name):
        return self.dies("here", point=name)

    def test_a(self):
        self.dies("source", "point-a")

    def test_b(self):
        self.outer("point-b")

    def test_c(self):
        env = {"SECUREMIG_CRASH_AT": "point-c,point-d:guest"}

    def test_d(self):
        crash_env("point-e")
        print("not-a-point")

    def test_e(self):
        point = "point-f,point-g:guest"
        self.dies("destination", point)

    def test_f(self):
        self.dies("source", CrashPoint.SOURCE_COMMITTED)
        crash_env(CrashPoint.NO_SUCH_POINT)
"""
        self.assertEqual(
            collect([sample]),
            {f"point-{c}" for c in "abcdefg"} | {"source-committed", "CrashPoint.NO_SUCH_POINT"},
        )
        self.assertEqual(collect(['x = {"OTHER": "point-z"}']), set())
