"""Contract tests of the Xen backend.

Xen cannot run here, so these run the backend against a stand-in ``xl``
(a small script this test writes) that keeps its domains in a JSON file,
records every call, and fails like ``xl`` does.  They check the commands
and their order, and that ``xl``'s errors reach the operator verbatim.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from securemig.hypervisor.bundle import Bundle, Image, Manifest
from securemig.hypervisor.xen import XenBackend, XenError

FAKE_XL = """#!{python}
import json, sys
STATE = {state!r}
with open(STATE) as f:
    state = json.load(f)
state["calls"].append(sys.argv[1:])
doms = state["domains"]
cmd, args = sys.argv[1], sys.argv[2:]
def done(code=0, out="", err=""):
    with open(STATE, "w") as f:
        json.dump(state, f)
    sys.stdout.write(out); sys.stderr.write(err); sys.exit(code)
def need(name):
    if name not in doms:
        done(1, err="xl: domain %s does not exist\\n" % name)
if cmd == "save":
    name, path = args[-2], args[-1]
    need(name)
    with open(path, "wb") as f:
        f.write(("xen-save:" + name + ":").encode() * 1000)
    doms[name] = "paused" if "-p" in args else None
    if doms[name] is None:
        del doms[name]
    done()
if cmd == "restore":
    with open(args[-1], "rb") as f:
        name = f.read().split(b":")[1].decode()
    doms[name] = "paused" if "-p" in args else "running"
    done()
if cmd == "unpause":
    need(args[0]); doms[args[0]] = "running"; done()
if cmd == "destroy":
    need(args[0]); del doms[args[0]]; done()
if cmd == "domid":
    need(args[0]); done(out="1\\n")
if cmd == "list":
    need(args[0])
    flag = "--p---" if doms[args[0]] == "paused" else "r-----"
    done(out="Name ID Mem VCPUs State Time(s)\\n%s 1 512 1 %s 1.0\\n" % (args[0], flag))
done(2, err="xl: unknown command\\n")
"""


class XenContractTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.base.mkdir()
        self.state = self.base / "xl-state.json"
        self.state.write_text(json.dumps({"domains": {"vm1": "running"}, "calls": []}))
        xl = self.base / "xl"
        xl.write_text(FAKE_XL.format(python=sys.executable, state=str(self.state)))
        xl.chmod(0o755)
        self.xen = XenBackend(str(xl))
        path = self.base / "vms" / "vm1"
        path.mkdir(parents=True)
        self.bundle = Bundle(path, Manifest("vm1", backend="xen", images=[Image("ram", 0)]))
        self.bundle.save()

    def xl_state(self) -> dict[str, object]:
        state: dict[str, object] = json.loads(self.state.read_text())
        return state

    async def test_suspend_saves_paused(self) -> None:
        """Suspend is `xl save -p`: the RAM image is written and its size
        recorded; the domain stays, paused, so the source can take it back."""
        self.assertEqual(self.xen.status(self.bundle), "running")
        await self.xen.suspend(self.bundle)
        ram = self.bundle.image_path("ram")
        self.assertEqual(self.xl_state()["calls"][-1], ["save", "-p", "vm1", str(ram)])
        self.assertEqual(Bundle.load(self.bundle.path).manifest.images[0].size, ram.stat().st_size)
        self.assertEqual(self.xen.status(self.bundle), "paused")

    async def test_rollback_at_source_unpauses(self) -> None:
        """After a failed migration the paused domain is unpaused, not restored."""
        await self.xen.suspend(self.bundle)
        await self.xen.resume(self.bundle)
        calls = self.xl_state()["calls"]
        self.assertIn(["unpause", "vm1"], calls)
        self.assertNotIn("restore", [c[0] for c in calls])  # type: ignore[index]
        self.assertEqual(self.xen.status(self.bundle), "running")

    async def test_resume_at_destination_restores(self) -> None:
        """Where no such domain exists, resume is `xl restore -p` then `xl unpause`."""
        await self.xen.suspend(self.bundle)
        await self.xen.discard(Bundle(self.base / "elsewhere", self.bundle.manifest))
        arrived = self.base / "arrived"
        arrived.mkdir()
        (arrived / "ram.img").write_bytes(self.bundle.image_path("ram").read_bytes())
        destination = Bundle(arrived, Manifest("vm1", backend="xen", images=[]))
        destination.save()
        await self.xen.resume(destination)
        calls = self.xl_state()["calls"]
        self.assertEqual(
            calls[-2:], [["restore", "-p", str(arrived / "ram.img")], ["unpause", "vm1"]]
        )
        self.assertEqual(self.xen.status(destination), "running")

    async def test_discard_destroys(self) -> None:
        await self.xen.suspend(self.bundle)
        await self.xen.discard(self.bundle)
        self.assertIn(["destroy", "vm1"], self.xl_state()["calls"])
        self.assertFalse(self.bundle.path.exists())
        self.assertEqual(self.xen.status(self.bundle), "absent")

    async def test_xl_errors_verbatim(self) -> None:
        """An `xl` failure reaches the operator with xl's own words."""
        self.state.write_text(json.dumps({"domains": {}, "calls": []}))
        with self.assertRaises(XenError) as cm:
            await self.xen.suspend(self.bundle)
        self.assertIn("xl: domain vm1 does not exist", str(cm.exception))
