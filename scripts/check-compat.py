"""Wire and journal compatibility with a previous release, by running both.

Checks out nothing itself: OLD_ROOT is a worktree of the previous release
(``git worktree add ../old 1106b0d``); its code runs with this checkout's
.venv and PYTHONPATH=OLD_ROOT (wrappers in OLD_ROOT/.compat-bin).  Hosts,
TPMs and the privacy CA come from this release's lab; every `twistd
securemig` and `securemig migrate` of the "old" side is the old release's.

  .venv/bin/python scripts/check-compat.py OLD_ROOT migrate CASE...
      CASE: SRC-DST-BACKEND-secure|insecure[-live], SRC and DST old or new,
      e.g. old-new-image-secure new-old-qemu-secure-live
  .venv/bin/python scripts/check-compat.py OLD_ROOT destination-crash POINT@SRC...
      an old destination killed at POINT; this release's daemon restarts on
      its state directory (and `securemig recover` with the source's journal)
  .venv/bin/python scripts/check-compat.py OLD_ROOT source-crash POINT@DST...
      an old `securemig migrate` killed at POINT; this release's daemon on
      the source's state directory settles the departure
  .venv/bin/python scripts/check-compat.py OLD_ROOT wire
      the old release's encoding of tests/protocol/test_previous_release.py's messages

Prints one JSON object per case (see doc/protocol.rst, "Checking compatibility").
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

from securemig.hypervisor.bundle import Bundle
from securemig.lab import processes
from securemig.lab.lab import DESTINATION, SOURCE, Lab

OLD = Path(sys.argv[1]).absolute()
NEW_PYTHON = Path(sys.executable)
VENVS = {"old": OLD / ".compat-bin", "new": NEW_PYTHON.parent}


def _wrappers() -> None:
    """``securemig`` and ``twistd`` that run the old release's code."""
    VENVS["old"].mkdir(exist_ok=True)
    run = (
        "import sys; from securemig.app.cli.main import main; "
        "sys.argv[0] = 'securemig'; sys.exit(main())"
    )
    for name, body in (
        ("securemig", f'exec {NEW_PYTHON} -c "{run}" "$@"'),
        ("twistd", f'exec {NEW_PYTHON.parent / "twistd"} "$@"'),
    ):
        path = VENVS["old"] / name
        path.write_text(f"#!/bin/sh\nPYTHONPATH={OLD} {body}\n")
        path.chmod(0o755)


_wrappers()
_role = {"who": "new"}


def script(name: str) -> str:
    return str(VENVS[_role["who"]] / name)


processes.script = script  # type: ignore[assignment]


def digests(b: Bundle) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(b.path.glob("*.img"))
    }


def run_case(case: str) -> dict:
    src, dst, backend, sec, *rest = case.split("-")
    live = "live" in rest
    secure = sec == "secure"
    work = Path(tempfile.mkdtemp(prefix=f"compat-{case}-"))
    lab = Lab(work)
    out: dict = {"case": case, "work": str(work)}
    try:
        lab.start()
        _role["who"] = dst
        dest = lab.start_destination(backend=backend)
        _role["who"] = "new"
        cmdline = None
        if live:
            from securemig.hypervisor import guest

            pcr16 = os.urandom(32).hex()
            cmdline = guest.cmdline(pcr16, 1, 8)
            # PCR 16 as the guest extended it at boot (SHA-256 bank).
            expected_pcr16 = hashlib.sha256(bytes(32) + bytes.fromhex(pcr16)).hexdigest()
        args = ("vm1", 160 if live else (64 if backend != "image" else 32), None if live else 16)
        if src == "old" and backend == "qemu":
            # A guest the old release started (its sockets where it puts them).
            import subprocess

            code = (
                "import sys; from pathlib import Path; from securemig.lab.lab import Lab; "
                f"Lab(Path({str(work)!r})).create_vm(*{args!r}, secure=True, backend='qemu', "
                f"guest_cmdline={cmdline!r})"
            )
            subprocess.run(
                [str(NEW_PYTHON), "-c", code],
                check=True,
                env={**os.environ, "PYTHONPATH": str(OLD)},
            )
            vm = Bundle.load(lab.vm_dir / "vm1")
        else:
            vm = lab.create_vm(*args, secure=True, backend=backend, guest_cmdline=cmdline)
        if backend == "qemu":
            from securemig.hypervisor.qemu import QemuBackend

            q = QemuBackend()
            for where in (vm.path, dest.state_dir / "vms" / "vm1"):
                lab.on_stop(partial(q.end_blocking, Bundle(where, vm.manifest)))
        watch = None
        if live:
            from securemig.hypervisor.heartbeat import Watch
            from securemig.hypervisor.qemu import heartbeat_path

            there0 = dest.state_dir / "vms" / "vm1"
            watch = Watch(heartbeat_path(vm), there0 / "heartbeat.log")
            out["first_heartbeat"] = watch.wait(3, timeout=120.0).seq
        before = digests(vm) if backend == "image" else None
        _role["who"] = src
        t = time.monotonic()
        try:
            summary, _ = lab.migrate(dest, "vm1", secure=secure, extra=("--live",) if live else ())
            out["outcome"] = summary.get("outcome")
            out["mode"] = summary.get("mode")
        except RuntimeError as e:
            out["outcome"] = "ERROR"
            out["error"] = str(e)[-600:]
        if watch is not None and out["outcome"] == "done":
            last = watch.wait(3, timeout=60.0, source=1)
            out["heartbeat_continuous"] = watch.continuous()
            out["guest_gap_ms"] = watch.largest_gap_ms()
            out["last_heartbeat"] = last.seq
            out["pcr16_kept"] = last.pcr16 == expected_pcr16
        out["seconds"] = round(time.monotonic() - t, 2)
        _role["who"] = "new"
        there = dest.state_dir / "vms" / "vm1"
        out["arrived"] = there.exists()
        out["source_copy_left"] = vm.path.exists()
        if there.exists() and before is not None:
            out["images_identical"] = digests(Bundle.load(there)) == before
        if there.exists() and backend == "qemu":
            b = Bundle.load(there)
            out["dest_status"] = q.status(b)
            out["vtpm_attached"] = q.vtpm_attached(b)
        if out["outcome"] == "ERROR":
            out["dest_log_tail"] = dest.log()[-1500:]
    except Exception:
        out["harness_error"] = traceback.format_exc()[-1500:]
    finally:
        lab.stop()
    return out


def securemig_new(*a):
    return subprocess.run([str(VENVS["new"] / "securemig"), *a], capture_output=True, text=True)


def run_destination_crash(point: str, src: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"compat-journal-{point}-"))
    lab = Lab(work)
    out = {"crash_at": point, "source": src, "work": str(work)}
    try:
        lab.start()
        _role["who"] = "old"
        dest = lab.start_destination(
            backend="image",
            keep=False,
            env={"SECUREMIG_CRASH_POINTS": "1", "SECUREMIG_CRASH_AT": point},
        )
        _role["who"] = "new"
        vm = lab.create_vm("vm1", 32, 16, secure=True)
        before = digests(vm)
        _role["who"] = src
        try:
            s, _ = lab.migrate(dest, "vm1", secure=True)
            out["migrate"] = s.get("outcome")
        except RuntimeError as e:
            out["migrate"] = str(e)[-300:]
        dest.process.wait(timeout=30)
        out["old_dest_exit"] = dest.process.returncode
        _role["who"] = "new"
        st = json.loads(
            securemig_new("status", "--state-dir", str(dest.state_dir), "--json").stdout
        )
        out["dest_journal_before"] = [(r.get("phase"), r.get("role")) for r in st]
        new = lab.start_destination(backend="image")  # same state dir
        time.sleep(3)
        st = json.loads(securemig_new("status", "--state-dir", str(new.state_dir), "--json").stdout)
        out["dest_journal_after_new_daemon"] = [r.get("phase") for r in st]
        srcj = work / "source-a-state" / "journal.sqlite"
        if any(p == "in-doubt" for p in out["dest_journal_after_new_daemon"]):
            new.stop()
            r = securemig_new(
                "recover",
                "--state-dir",
                str(new.state_dir),
                "--identity",
                str(work / DESTINATION),
                "--source-journal",
                str(srcj),
            )
            out["recover"] = (r.returncode, (r.stdout + r.stderr).strip()[-400:])
            st = json.loads(
                securemig_new("status", "--state-dir", str(new.state_dir), "--json").stdout
            )
            out["dest_journal_after_recover"] = [r.get("phase") for r in st]
        there = new.state_dir / "vms" / "vm1"
        out["at_destination"] = there.exists() and digests(Bundle.load(there)) == before
        out["at_source"] = vm.path.exists() and digests(Bundle.load(vm.path)) == before
        out["staging_left"] = sorted(str(p.name) for p in (new.state_dir / "staging").glob("*"))
        out["dest_log_errors"] = [
            line[-250:] for line in new.log().splitlines() if "rror" in line or "Traceback" in line
        ][:5]
    except Exception:
        out["harness_error"] = traceback.format_exc()[-1500:]
    finally:
        lab.stop()
    return out


def status(d):
    r = subprocess.run(
        [str(VENVS["new"] / "securemig"), "status", "--state-dir", str(d), "--json"],
        capture_output=True,
        text=True,
    )
    return [x.get("phase") for x in json.loads(r.stdout)] if r.returncode == 0 else r.stderr[-300:]


def run_source_crash(point: str, dst: str) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"compat-srcj-{point}-"))
    lab = Lab(work)
    out = {"crash_at": point, "destination": dst, "work": str(work)}
    try:
        lab.start()
        _role["who"] = dst
        dest = lab.start_destination(backend="image")
        _role["who"] = "new"
        vm = lab.create_vm("vm1", 32, 16, secure=True)
        before = digests(vm)
        _role["who"] = "old"
        try:
            lab.migrate(
                dest,
                "vm1",
                secure=True,
                env={"SECUREMIG_CRASH_POINTS": "1", "SECUREMIG_CRASH_AT": point},
            )
            out["migrate"] = "done?!"
        except RuntimeError as e:
            out["migrate"] = str(e)[-160:]
        srcstate = work / "source-a-state"
        out["source_journal_old"] = status(srcstate)
        out["dest_journal"] = status(dest.state_dir)
        (work / "destination-source-a").symlink_to(srcstate)
        _role["who"] = "new"
        home = lab.start_destination(
            host=SOURCE, backend="image", extra=("--resolve-interval", "1")
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            time.sleep(2)
            if status(dest.state_dir) and status(dest.state_dir)[0] in ("done", "aborted"):
                break
        time.sleep(2)
        out["source_journal_after_new_daemon"] = status(srcstate)
        out["dest_journal_after"] = status(dest.state_dir)
        there = dest.state_dir / "vms" / "vm1"
        out["at_destination"] = there.exists() and digests(Bundle.load(there)) == before
        out["at_source"] = vm.path.exists()
        out["source_daemon_log"] = [
            line[-220:] for line in home.log().splitlines() if "recover" in line or "rror" in line
        ][:6]
    except Exception:
        out["harness_error"] = traceback.format_exc()[-1500:]
    finally:
        lab.stop()
    return out


WIRE = """
import json
from securemig.protocol import wire
from securemig.protocol.errors import ErrorCode
mid = bytes(range(16))
def h(**kw):
    a = dict(version=1, variant=wire.Variant.FULL, vm_name="vm1", chunk_size=1 << 20,
             images=(wire.ImageInfo("ram", 10), wire.ImageInfo("disk", 1 << 30)), shared_disk="")
    a.update(kw); return wire.Hello(**a)
msgs = {
 "hello_v1": h(memory_mib=64),
 "hello_v2_image": h(version=2, backend="image", vtpm=1),
 "hello_v2_qemu_linux": h(version=2, memory_mib=160, guest="linux",
     guest_cmdline="console=ttyS0 quiet", backend="qemu", vtpm=1),
 "hello_v2_live_shared": h(version=2, variant=wire.Variant.SHARED_STORAGE, images=(),
     shared_disk="/srv/vm1.img", memory_mib=160, guest="linux", guest_cmdline="quiet",
     mode=wire.Mode.LIVE, backend="qemu", vtpm=1),
 "welcome": wire.Welcome(mid, 4242),
 "live_ready": wire.LiveReady(5151),
 "prepared": wire.Prepared(), "commit": wire.Commit(), "done": wire.Done(),
 "abort": wire.Abort(ErrorCode.BACKEND_MISMATCH, "a qemu VM; this host runs image"),
 "resolve": wire.Resolve(mid, wire.Decision.COMMITTED),
 "resolved": wire.Resolved(mid, wire.Settled.DONE, "resumed"),
}
print(json.dumps({k: wire.encode(v).hex() for k, v in msgs.items()}, indent=1))
"""


def wire_bytes() -> None:
    import subprocess

    subprocess.run(
        [str(NEW_PYTHON), "-c", WIRE], check=True, env={**os.environ, "PYTHONPATH": str(OLD)}
    )


if __name__ == "__main__":
    what, cases = sys.argv[2], sys.argv[3:]
    if what == "wire":
        wire_bytes()
    for arg in cases:
        if what == "migrate":
            print(json.dumps(run_case(arg), indent=1), flush=True)
        elif what == "destination-crash":
            print(json.dumps(run_destination_crash(*arg.split("@")), indent=1), flush=True)
        elif what == "source-crash":
            print(json.dumps(run_source_crash(*arg.split("@")), indent=1), flush=True)
