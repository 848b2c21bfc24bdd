"""Packaging: the wheel built from this tree installs into a fresh virtual
environment (no access to the checkout or the development venv) and serves
``securemig`` and ``twistd securemig`` from there; its metadata says the
version once and keeps matplotlib optional; the development install is an
editable install that twistd still finds the plugin through."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
import zipfile
from email.parser import Parser
from importlib.metadata import version
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import securemig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: Wheels of the dependencies, made by `make setup`: the fresh venv installs offline.
WHEELHOUSE = BIN.parent / "wheelhouse"


def run(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command with nothing of the checkout on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@functools.cache
def built() -> tuple[Path, Path]:
    """Build the wheel from this tree and install it, with its dependencies
    from :data:`WHEELHOUSE` only, into a new venv in trial's working
    directory (once per test process); the wheel and the venv."""
    # A directory of its own per call: trial -j2 may run these tests in two
    # workers at once, and setuptools builds in the source tree's build/,
    # so each builds from its own copy of the tree.
    work = Path(tempfile.mkdtemp(prefix="packaging-", dir=".")).absolute()
    if not WHEELHOUSE.is_dir():
        raise AssertionError(f"no {WHEELHOUSE}: run `make setup` (it builds the wheelhouse)")
    source = work / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".cache", "_trial_temp*", "build", "*.egg-info", "_build", "bench-out"
        ),
    )
    made = run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "--wheel-dir", work / "dist", source, cwd=work,
    )  # fmt: skip
    if made.returncode:
        raise AssertionError(f"pip wheel failed:\n{made.stdout}{made.stderr}")
    (wheel,) = (work / "dist").glob("securemig-*.whl")
    venv = work / "venv"
    made = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    if made.returncode:
        raise AssertionError(f"python -m venv failed:\n{made.stderr}")
    # This venv's pip installs into the new one (pip --python), offline.
    made = run(
        sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
        "--no-index", "--find-links", WHEELHOUSE, wheel, cwd=work,
    )  # fmt: skip
    if made.returncode:
        raise AssertionError(f"installing the wheel failed:\n{made.stdout}{made.stderr}")
    return wheel, venv


class WheelTests(SynchronousTestCase):
    """The wheel, installed where the checkout is out of reach."""

    def setUp(self) -> None:
        self.wheel, self.venv = built()
        self.bin = self.venv / "bin"
        self.elsewhere = self.venv.parent

    def test_securemig_version(self) -> None:
        """``securemig --version`` runs from the fresh venv and says the one version."""
        shown = run(self.bin / "securemig", "--version", cwd=self.elsewhere)
        self.assertEqual(
            (shown.returncode, shown.stdout), (0, f"securemig {version('securemig')}\n")
        )
        where = run(
            self.bin / "python", "-c", "import securemig; print(securemig.__file__)",
            cwd=self.elsewhere,
        )  # fmt: skip
        self.assertTrue(where.stdout.startswith(str(self.venv)), where.stdout + where.stderr)

    def test_twistd_serves_the_plugins(self) -> None:
        """``twistd --help`` of the fresh venv lists both services, and
        ``twistd securemig --help`` and ``twistd securemig-pca --help`` run."""
        listed = run(self.bin / "twistd", "--help", cwd=self.elsewhere)
        self.assertEqual(listed.returncode, 0, listed.stderr)
        for plugin, option in (("securemig", "--state-dir="), ("securemig-pca", "--dir=")):
            self.assertIn(f"    {plugin} ", listed.stdout)
            shown = run(self.bin / "twistd", plugin, "--help", cwd=self.elsewhere)
            self.assertEqual(shown.returncode, 0, shown.stderr)
            self.assertIn(f"Usage: twistd [options] {plugin} ", shown.stdout)
            self.assertIn(option, shown.stdout)

    def test_contents(self) -> None:
        """The plugin ships without Twisted's own ``__init__`` files (a wheel
        holding them would replace Twisted's), with the LICENSE, and nothing
        of tests/ or doc/."""
        names = zipfile.ZipFile(self.wheel).namelist()
        self.assertIn("twisted/plugins/securemig_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertIn("securemig/app/cli/main.py", names)
        self.assertTrue(any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names)
        self.assertEqual([n for n in names if n.split("/")[0] in ("tests", "doc")], [])

    def test_metadata(self) -> None:
        """Version from securemig/__init__.py, the MIT licence as an SPDX
        expression, the console script, matplotlib only in extras."""
        with zipfile.ZipFile(self.wheel) as whl:
            (meta,) = (n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = Parser().parsestr(whl.read(meta).decode())
            (ep,) = (n for n in whl.namelist() if n.endswith(".dist-info/entry_points.txt"))
            entry_points = whl.read(ep).decode()
        self.assertEqual(metadata["Version"], securemig.__version__)
        self.assertEqual(metadata["License-Expression"], "MIT")
        self.assertIn("securemig = securemig.app.cli.entry:main", entry_points)
        self.assertIn("bench", metadata.get_all("Provides-Extra") or [])
        matplotlib = [
            r for r in metadata.get_all("Requires-Dist") or [] if r.startswith("matplotlib")
        ]
        self.assertTrue(matplotlib)
        for requirement in matplotlib:
            self.assertIn("extra ==", requirement)


class SourceTests(SynchronousTestCase):
    """pyproject.toml and the development install."""

    def test_version_said_once(self) -> None:
        """pyproject.toml takes the version from securemig.__version__ (no
        setup.cfg, no literal), and the installed distribution says the same."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())
        self.assertFalse((ROOT / "setup.cfg").exists())
        self.assertNotIn("version", project["project"])
        self.assertIn("version", project["project"]["dynamic"])
        self.assertEqual(
            project["tool"]["setuptools"]["dynamic"]["version"], {"attr": "securemig.__version__"}
        )
        self.assertEqual(version("securemig"), securemig.__version__)
        self.assertTrue((ROOT / "LICENSE").read_text().startswith("MIT License"))

    def test_editable_install_is_a_path_file(self) -> None:
        """The development venv's editable install (``make setup``) is a .pth
        naming the checkout, not setuptools' import hook (which twistd's
        plugin search cannot see), and twistd run outside the checkout lists
        the plugin."""
        site = Path(sysconfig.get_paths()["purelib"])
        if not (ROOT / "securemig").samefile(Path(securemig.__file__).parent):
            raise AssertionError("securemig is not imported from this checkout: run make setup")
        pth = list(site.glob("__editable__.securemig-*.pth"))
        self.assertEqual(len(pth), 1, f"no editable install in {site}: run make setup")
        self.assertEqual(Path(pth[0].read_text().strip()).resolve(), ROOT)
        self.assertEqual(list(site.glob("__editable__*securemig*finder.py")), [])
        listed = run(BIN / "twistd", "--help", cwd=site)
        self.assertIn("    securemig-pca ", listed.stdout)
