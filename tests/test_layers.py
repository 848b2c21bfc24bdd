"""
The package's layering, checked: no import cycles, arrows only point down.

Every import of a securemig module counts, also one inside a function
(those are how cycles hide).  ``doc/architecture.rst`` explains the layers.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import securemig
from securemig.hypervisor import backends, bundle
from securemig.trust import vtpm
from securemig.trust.tpm import swtpm

ROOT = Path(securemig.__file__).parent
TESTS = Path(__file__).parent

#: Bottom to top; a module may import its own layer and those below it.
LAYERS = (
    "securemig.protocol",
    "securemig.files",
    "securemig.runtime",
    "securemig.crashpoint",
    "securemig.metrics",
    "securemig.logcontext",
    "securemig.trust",
    "securemig.hypervisor",
    "securemig.host",
    "securemig.transport",
    "securemig.lab",
    "securemig.app",
)

#: Where backends and the vTPM may be named by string: the layers that
#: implement them.  Everywhere else asks the registry and its capabilities
#: (``securemig.hypervisor.backends``), so a new backend touches no module
#: above ``hypervisor/``.
NAMING_BACKENDS = ("securemig/hypervisor/", "securemig/trust/")

#: Names no other module spells as a string literal: every registered
#: backend kind, the ones to come, and the vTPM's names.
BACKEND_NAMES = frozenset({"libvirt", "swtpm", "vtpm"})

#: Words that make any literal without spaces a vTPM name ("vtpm-ca",
#: "vtpm_key", "swtpm.log"), and the vTPM's file names that have neither
#: (swtpm's state file, the sealed key): where its files are and what they
#: are called is trust/'s and hypervisor/'s to say.
VTPM_WORDS = frozenset({"vtpm", "swtpm"})
VTPM_FILES = frozenset({swtpm.STATE_FILE, bundle.VTPM_KEY, vtpm.CA_DIR})

#: The modules above ``hypervisor/`` that name a backend on purpose, and why.
BACKEND_NAME_EXEMPT = {
    # The demo shows QEMU's own features: the marker in guest RAM read back
    # over QMP, the attached vTPM, and its live variant is QEMU's.
    "securemig/lab/demo.py": "the QEMU demo",
    # Times QEMU's own suspend and resume.
    "securemig/lab/bench/qemu.py": "a benchmark of QEMU itself",
    # Compares securemig's live migration with QEMU's own TLS and plain ones.
    "securemig/lab/bench/live.py": "a benchmark against QEMU's own migration",
    # Times a TPM and records which: a fresh swtpm of its own or the one given.
    "securemig/lab/bench/tpm.py": "a benchmark naming the TPM it timed",
    # Runs libvirtd itself: the run directory of libvirt's QEMU driver is "qemu".
    "securemig/lab/libvirt.py": "the lab's libvirt hosts, libvirt's own directories",
    # Shows libvirt's own parts: its secret (virsh secret-get-value), its
    # domain definitions on two libvirtds, LIBVIRT_DEFAULT_URI per daemon.
    "securemig/lab/demo_libvirt.py": "the libvirt demo",
    # Compares securemig with libvirt's own migration, TLS and plain.
    "securemig/lab/bench/libvirt.py": "a benchmark against libvirt's own migration",
}

#: What the sans-IO layer must never import.
NOT_IN_PROTOCOL = ("twisted", "socket", "securemig.host", "securemig.transport", "shutil")


def module_name(path: Path) -> str:
    """The dotted name of a module file of the package."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """Every module ``path`` imports, and whether the import is inside a function."""
    return imports_of_source(path.read_text())


def imports_of_source(source: str) -> list[tuple[str, bool]]:
    """Every module ``source`` imports, and whether the import is inside a function."""
    tree = ast.parse(source)
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module, inner))
                # ``from securemig.x import y`` may import a module y.
                found.extend((f"{child.module}.{a.name}", inner) for a in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def imports_of_test_module(path: Path) -> list[str]:
    """Every ``tests`` module the test-tree file ``path`` imports."""
    parts = path.relative_to(TESTS.parent).with_suffix("").parts
    package = parts if parts[-1] == "__init__" else parts[:-1]
    return imports_of_test_source(path.read_text(), package)


def imports_of_test_source(source: str, package: tuple[str, ...]) -> list[str]:
    """Every ``tests`` module ``source``, a module of ``package``, imports,
    relative imports resolved (``from ..support import x`` in ``tests.app``:
    ``tests.support`` and ``tests.support.x``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found += [module, *(f"{module}.{a.name}" for a in node.names)]
    return [m for m in found if m == "tests" or m.startswith("tests.")]


def is_test_module(name: str) -> bool:
    """Whether the dotted ``name`` is a test module (``tests.x.test_y``)."""
    return name.split(".")[-1].startswith("test_")


def backend_literals(source: str, names: frozenset[str]) -> list[tuple[int, str]]:
    """(line, literal) of every string constant of ``source`` that is exactly
    one of ``names`` (case aside): ``backend == "qemu"``, ``default="image"``;
    or a vTPM name: a literal without spaces with a word of
    :data:`VTPM_WORDS` (``"vtpm-ca"``), or one of :data:`VTPM_FILES`.  A
    sentence that mentions them passes (an f-string's parts are literals)."""
    return [
        (node.lineno, node.value)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (node.value.lower() in names or is_vtpm_name(node.value))
    ]


def is_vtpm_name(literal: str) -> bool:
    """Whether ``literal`` names the vTPM or one of its files (not a sentence)."""
    if literal in VTPM_FILES:
        return True
    if re.search(r"\s", literal):
        return False
    return bool(VTPM_WORDS & set(re.split(r"[^a-z0-9]+", literal.lower())))


def graph() -> dict[str, set[str]]:
    """Module -> the securemig modules it imports."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {m for m, _ in imports(path) if m in modules and m != name}
    return edges


def layer(module: str) -> int:
    """The index of the layer ``module`` belongs to."""
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return index
    raise AssertionError(f"{module} is in no layer")


def find_cycles(edges: dict[str, set[str]]) -> list[str]:
    """Every path by which a module reaches itself."""
    cycles = []
    for start in edges:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, nxt]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    return cycles


#: Function-local imports of our own that are allowed, as (importer,
#: imported package): ``securemig demo`` and ``securemig bench`` import the
#: lab in their command functions so that every other command (``migrate``
#: first, whose start-up the benchmark measures) does not pay for it
#: (about a tenth of the CLI's import time; tests/app/test_cli.py checks it).
#: The libvirt backend's module likewise (tens of milliseconds of CPU): the
#: registry and ``vm adopt`` import it when a libvirt backend is first made,
#: knowing its capabilities and default URI from hypervisor/libvirt_info.py
#: until then (tests/app/test_cli.py checks it is not imported at start).
LAZY_IMPORTS = (
    ("securemig.app.cli.lab", "securemig.lab"),
    ("securemig.hypervisor.backends", "securemig.hypervisor.libvirt"),
    ("securemig.app.cli.vm_libvirt", "securemig.hypervisor.libvirt"),
    # The console script's entry: `migrate --daemon` must start without the
    # full command's imports (Twisted, cryptography, the TSS).
    ("securemig.app.cli.entry", "securemig.app.cli.main"),
)


class LayerTests(SynchronousTestCase):
    def test_no_cycles(self) -> None:
        """No module reaches itself through imports, function-local ones included."""
        self.assertEqual(find_cycles(graph()), [])

    def test_checker_sees_local_imports_and_cycles(self) -> None:
        """Control: a function-local import counts, and a cycle through it is found."""
        found = imports_of_source("def f():\n    from securemig.host import journal\n")
        self.assertEqual(found[0], ("securemig.host", True))
        self.assertEqual(
            find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}), ["a -> b -> a", "b -> a -> b"]
        )

    def test_arrows_point_down(self) -> None:
        """A module imports only its own layer and the layers below."""
        wrong = [
            f"{a} -> {b}"
            for a, targets in graph().items()
            for b in targets
            if a != "securemig" and b != "securemig" and layer(b) > layer(a)
        ]
        self.assertEqual(wrong, [])

    def test_no_function_local_imports_of_our_own(self) -> None:
        """securemig modules are imported at the top, where a reader sees them
        (but for :data:`LAZY_IMPORTS`, each with its reason)."""
        local = [
            f"{module_name(p)}: {m}"
            for p in ROOT.rglob("*.py")
            for m, inner in imports(p)
            if inner
            and m.startswith("securemig")
            and not any(
                module_name(p) == importer and (m == lab or m.startswith(lab + "."))
                for importer, lab in LAZY_IMPORTS
            )
        ]
        self.assertEqual(local, [])

    def test_protocol_layer_is_sans_io(self) -> None:
        """The sans-IO core imports no reactor, socket, file helper or host code."""
        bad = [
            f"{module_name(p)}: {m}"
            for p in (ROOT / "protocol").rglob("*.py")
            for m, _ in imports(p)
            if m.split(".")[0] in NOT_IN_PROTOCOL or m.startswith(NOT_IN_PROTOCOL)
        ]
        self.assertEqual(bad, [])

    def test_no_backend_names_above_hypervisor(self) -> None:
        """Outside hypervisor/ and trust/ (and the exempt modules, each with its
        reason) no string literal names a backend kind or the vTPM: the
        registry and its capabilities answer instead."""
        names = BACKEND_NAMES | frozenset(backends.kinds())
        found = []
        for path in sorted(ROOT.rglob("*.py")):
            where = path.relative_to(ROOT.parent).as_posix()
            if where.startswith(NAMING_BACKENDS) or where in BACKEND_NAME_EXEMPT:
                continue
            found += [f"{where}:{n}: {v!r}" for n, v in backend_literals(path.read_text(), names)]
        self.assertEqual(found, [])

    def test_backend_literal_checker_finds_them(self) -> None:
        """Control: the checker sees a comparison, a default and a choice, and
        passes a sentence that merely mentions a backend; it sees vTPM names
        and file names, also inside a path or an f-string, and passes a
        sentence about the vTPM and a name that merely contains "tpm"."""
        source = (
            'def f(backend="image"):\n'
            '    if backend == "QEMU":\n'
            '        return ("xen", "a qemu guest")\n'
        )
        self.assertEqual(
            backend_literals(source, frozenset({"image", "qemu", "xen"})),
            [(1, "image"), (2, "QEMU"), (3, "xen")],
        )
        vtpm_source = (
            'CA = "vtpm-ca"\n'
            'key = d / "vtpm_key.sealed"\n'
            'state = d / "tpm2-00.permall"\n'
            'log = f"{d}/swtpm.log"\n'
            'print("the vTPM key, swtpm and the vtpm-ca directory")\n'
            'metric = "securemig_tpm_queue"\n'
        )
        self.assertEqual(
            backend_literals(vtpm_source, frozenset()),
            [(1, "vtpm-ca"), (2, "vtpm_key.sealed"), (3, "tpm2-00.permall"), (4, "/swtpm.log")],
        )
        for exempt in BACKEND_NAME_EXEMPT:
            self.assertTrue((ROOT.parent / exempt).exists(), exempt)


class TestTreeTests(SynchronousTestCase):
    """The test tree mirrors the package: what test modules share lives in
    ``tests/support/``, and no test module imports another (it would run
    that module's set-up, and its tests where a class was imported, in the
    wrong place; and a fixture would be found only by knowing its user)."""

    def test_no_test_module_imports_another(self) -> None:
        """Every import of a test module from anywhere in ``tests/`` (a
        function-local one too) is listed; there are none."""
        found = [
            f"{path.relative_to(TESTS.parent)}: {name}"
            for path in sorted(TESTS.rglob("*.py"))
            for name in imports_of_test_module(path)
            if any(is_test_module(part) for part in name.split(".")[:3])
        ]
        self.assertEqual(found, [])

    def test_checker_resolves_relative_imports(self) -> None:
        """Control: relative imports of test modules, at the top or inside a
        function, are seen with their absolute names."""
        source = (
            "from ..hypervisor.test_qemu import under_tcg\n"
            "def f():\n"
            "    from .test_crash import x\n"
            "    from tests.support import qemu\n"
        )
        found = imports_of_test_source(source, ("tests", "app"))
        self.assertIn("tests.hypervisor.test_qemu", found)
        self.assertIn("tests.app.test_crash", found)
        self.assertIn("tests.support.qemu", found)
        self.assertTrue(is_test_module("tests.app.test_crash"))
        self.assertFalse(is_test_module("tests.support.qemu"))


class TestCaseAttributeTests(SynchronousTestCase):
    def test_no_test_assigns_its_id(self) -> None:
        """No test sets ``self.id``: it shadows ``TestCase.id()``, and under
        ``trial -j`` the worker then crashes reporting the test, erroring
        every later test it runs (twice seen in full runs).  A broken test
        module that assigns it makes this list non-empty."""
        found = [
            f"{path.relative_to(TESTS.parent)}:{number}"
            for path in sorted(TESTS.rglob("*.py"))
            for number, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"\bself\.id\s*(:[^=]*)?=[^=]", line)
        ]
        self.assertEqual(found, [])
