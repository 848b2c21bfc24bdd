"""The Twisted shell is typed against the host contract: no parameter or
attribute of ``transport/`` that holds a host, arrival, departure or
security object is annotated ``Any`` (mypy --strict accepts ``Any``; this
check does not).  ``doc/architecture.rst`` states the rule."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import securemig

TRANSPORT = Path(securemig.__file__).parent / "transport"

#: Names that hold host or security objects wherever they appear.
HOST_OR_SECURITY = frozenset(
    {
        "host",
        "arrival",
        "departure",
        "security",
        "key_keeper",
        "keeper",
        "sealer",
        "opener",
        "new_opener",
        "unwrapper",
    }
)


def any_annotated(source: str) -> list[tuple[int, str]]:
    """(line, name) of every parameter, and attribute or variable
    annotation, named in :data:`HOST_OR_SECURITY` and annotated ``Any``."""
    found = []

    def is_any(node: ast.expr | None) -> bool:
        # ``Any`` anywhere in it: ``Any``, ``Any | None``, ``Callable[[], Any]``.
        return node is not None and any(
            isinstance(n, ast.Name) and n.id == "Any" for n in ast.walk(node)
        )

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.arg) and node.arg in HOST_OR_SECURITY and is_any(node.annotation):
            found.append((node.lineno, node.arg))
        elif isinstance(node, ast.AnnAssign) and is_any(node.annotation):
            target = node.target
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name in HOST_OR_SECURITY:
                found.append((node.lineno, name))
    return sorted(found)


class TypedShellTests(SynchronousTestCase):
    def test_checker_finds_them(self) -> None:
        """The check sees parameters and attribute annotations alike."""
        source = (
            "def f(host: Any, clock: Any) -> None:\n"
            "    self.arrival: Any = None\n"
            "    self.security: Security | None = None\n"
            "    other: Any = None\n"
        )
        self.assertEqual(any_annotated(source), [(1, "host"), (2, "arrival")])

    def test_no_any_for_host_or_security_objects(self) -> None:
        """Every transport module names the host contract's or the trust
        layer's types for what it holds of them."""
        found = {
            path.name: hits
            for path in sorted(TRANSPORT.glob("*.py"))
            if (hits := any_annotated(path.read_text()))
        }
        self.assertEqual(found, {})
