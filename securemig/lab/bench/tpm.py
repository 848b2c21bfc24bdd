"""
``securemig bench --tpm``: the fixed costs of attestation on a TPM.

By default a fresh swtpm of the bench's own (provisioned, then started); with
``--tcti TCTI`` the TPM at that TCTI (the host's, e.g.
``device:/dev/tpmrm0``), which is neither provisioned nor changed beyond the
transient objects each operation loads and flushes.  The table and the JSON
say which TPM was timed.

Medians over ``repeat`` runs of: creating an ECC P-256 AK, a quote over the
default PCRs, its verification in software, a migration key (ECC) and its
TPM2_Certify, an ECDH_ZGen under the PCR policy (the unwrap), and a whole
enrollment with an in-process privacy CA (EK check, MakeCredential,
ActivateCredential, AK certificate; only on the fresh swtpm, whose EK
certificate's CA the bench made: a given TPM's maker's CA is not at hand).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from securemig import runtime
from securemig.lab.bench.provenance import one_line, provenance
from securemig.trust import attest
from securemig.trust.pca.core import Authorization, PrivacyCA
from securemig.trust.tpm import swtpm
from securemig.trust.tpm.tpm import TPM

PCRS = [0, 1, 2, 3, 4, 7]


def _time(fn: Callable[[], Any], repeat: int) -> tuple[float, float, float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), min(samples), max(samples)


def run(repeat: int = 50, json_path: Path | None = None, tcti: str | None = None) -> int:
    """Print the table (with ``json_path``, write it there as JSON too) of
    the TPM at ``tcti``, or of a fresh swtpm; returns an exit status."""
    info = provenance()
    work = Path(tempfile.mkdtemp(prefix="securemig-bench-tpm-"))
    rows: list[tuple[str, tuple[float, float, float]]] = []
    process = None
    # A fresh swtpm is the bench's own: its lock file goes to the bench's run
    # directory; a TPM given with --tcti is shared, its lock file is the host's.
    locks = contextlib.ExitStack()
    try:
        if tcti is None:
            locks.enter_context(runtime.own_run_dir(work))
            start = time.perf_counter()
            swtpm.provision(work / "tpm", work / "ca")
            provision = time.perf_counter() - start
            rows.append(("provision swtpm (EK certs)", (provision, provision, provision)))
            process = swtpm.start(work / "tpm")
            timed = {"kind": "swtpm", "tcti": process.tcti, "fresh": True}
            what = f"a fresh swtpm of the bench's own (pid {process.process.pid}), {process.tcti}"
        else:
            timed = {"kind": "given", "tcti": tcti, "fresh": False}
            what = f"the TPM at TCTI {tcti} (given with --tcti)"
        with TPM(str(timed["tcti"])) as tpm:
            ak = tpm.create_ak()
            rows.append(("create ECC AK", _time(tpm.create_ak, repeat)))
            nonce = os.urandom(32)
            quote = tpm.quote(ak, PCRS, nonce)
            values = tpm.pcr_read(PCRS)
            rows.append(("quote", _time(lambda: tpm.quote(ak, PCRS, nonce), repeat)))
            rows.append(
                (
                    "verify quote",
                    _time(
                        lambda: attest.verify_quote(
                            ak.public,
                            quote.attest,
                            quote.signature,
                            qualifying=nonce,
                            pcrs=PCRS,
                            values=values,
                            golden=values,
                        ),
                        repeat,
                    ),
                )
            )
            key = tpm.create_migration_key(PCRS, values)
            rows.append(
                (
                    "create migration key",
                    _time(lambda: tpm.create_migration_key(PCRS, values), repeat),
                )
            )
            rows.append(
                ("certify migration key", _time(lambda: tpm.certify(key, ak, nonce), repeat))
            )
            peer = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
            point = (peer.x.to_bytes(32, "big"), peer.y.to_bytes(32, "big"))
            rows.append(
                (
                    "ECDH_ZGen under PCR policy",
                    _time(lambda: tpm.ecdh_zgen(key, PCRS, point), repeat),
                )
            )
            if tcti is not None:
                return _report(rows, repeat, what, timed, info, json_path, enrolled=False)
            pca = PrivacyCA.init(work / "pca", swtpm.ca_certificates(work / "ca"))

            def enroll() -> None:
                challenge = pca.begin(
                    "bench-host",
                    tpm.ek_certificate(),
                    tpm.ek_public(),
                    ak.public,
                    Authorization(("bench-host",)),
                )
                secret = tpm.activate_credential(
                    ak, challenge.credential_blob, challenge.encrypted_secret
                )
                pca.finish(challenge.enrollment_id, secret)

            rows.append(("enrollment (in process)", _time(enroll, max(5, repeat // 10))))
    finally:
        if process is not None:
            process.stop()
        locks.close()
        shutil.rmtree(work, ignore_errors=True)
    return _report(rows, repeat, what, timed, info, json_path, enrolled=True)


def _report(
    rows: list[tuple[str, tuple[float, float, float]]],
    repeat: int,
    what: str,
    timed: dict[str, Any],
    info: dict[str, Any],
    json_path: Path | None,
    enrolled: bool,
) -> int:
    print(one_line(info))
    print(f"TPM timed: {what}; medians of {repeat}")
    print(f"{'operation':<30} {'median ms':>10} {'min ms':>9} {'max ms':>9}")
    for name, (median, low, high) in rows:
        print(f"{name:<30} {median * 1000:>10.2f} {low * 1000:>9.2f} {high * 1000:>9.2f}")
    if not enrolled:
        print("enrollment: not timed (it needs the CA of this TPM's EK certificate)")
    if json_path is not None:
        document = {
            "mode": "tpm",
            "provenance": info,
            "tpm": {**timed, "description": what},
            "repeat": repeat,
            "records": [
                {
                    "operation": name,
                    "median_ms": round(median * 1000, 3),
                    "min_ms": round(low * 1000, 3),
                    "max_ms": round(high * 1000, 3),
                    "tpm": timed["tcti"],
                    "provenance": info,
                }
                for name, (median, low, high) in rows
            ],
            "enrollment_timed": enrolled,
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {json_path}", file=sys.stderr)
    return 0
