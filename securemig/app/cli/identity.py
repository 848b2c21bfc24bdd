"""``securemig ca``, ``securemig pca`` and ``securemig host``: the site CA,
the privacy CA and a host's identity (TLS, attestation key)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from securemig.app.cli.common import (
    EXIT_OK,
    CommandError,
    Subparsers,
    describe,
    error,
    usage_error,
)
from securemig.trust.attest import ak_name
from securemig.trust.identity import IdentityExists, init_host, issue_tls, kept_aside, renew_host
from securemig.trust.pca.client import EnrollmentRefused
from securemig.trust.pca.core import (
    MAX_TOKEN_TTL,
    TOKEN_TTL,
    PrivacyCA,
    VendorCAError,
    check_vendor_ca,
)
from securemig.trust.pki import Authority, check_host_name
from securemig.trust.tpm.tpm import AK_TEMPLATES, EK_KINDS, TPMError


def add_parser(subparsers: Subparsers) -> None:
    """Register ``securemig ca``, ``securemig pca`` and ``securemig host``."""
    ca = subparsers.add_parser("ca", help="a site CA for host TLS certificates")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    ca_init = ca_sub.add_parser("init", help="create a site CA in DIR (ca.key, ca.pem)")
    ca_init.add_argument("dir", type=Path)
    ca_init.add_argument("--name", default="securemig site CA", help="the CA's common name")
    ca_init.set_defaults(func=cmd_ca_init)
    ca_issue = ca_sub.add_parser("issue", help="issue a TLS key and certificate for a host")
    ca_issue.add_argument("dir", type=Path, help="the site CA's directory")
    ca_issue.add_argument("--name", required=True, help="the host name (subjectAltName)")
    ca_issue.add_argument(
        "--out", type=Path, required=True, help="directory for tls.key and tls.pem"
    )
    ca_issue.set_defaults(func=cmd_ca_issue)

    pca = subparsers.add_parser(
        "pca", help="set up a privacy CA (run it with twistd securemig-pca)"
    )
    pca_sub = pca.add_subparsers(dest="pca_command", required=True, metavar="ACTION")
    pca_init = pca_sub.add_parser("init", help="create a privacy CA in DIR")
    pca_init.add_argument("dir", type=Path)
    pca_init.add_argument(
        "--vendor-ca",
        type=Path,
        action="append",
        required=True,
        help="a trusted TPM-vendor CA certificate (PEM), or a directory: every "
        "certificate in its *.pem files (e.g. the vendor CA of securemig tpm simulate); "
        "repeatable",
    )
    pca_init.add_argument(
        "--tls-name",
        help="also issue the privacy CA's HTTPS key and certificate for this host name, "
        "from --site-ca (its directory), into DIR/tls.key and DIR/tls.pem "
        "(twistd securemig-pca uses them)",
    )
    pca_init.add_argument(
        "--site-ca",
        type=Path,
        help="the site CA (its directory, as `securemig ca init` makes, or its ca.pem): a "
        "client presenting a TLS certificate from it may enroll the host it names (else "
        "only tokens of `pca authorize` authorize enrollments)",
    )
    pca_init.set_defaults(func=cmd_pca_init)

    def pca_command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        command = pca_sub.add_parser(name, help=help, description=description)
        command.add_argument(
            "--dir", type=Path, required=True, help="the privacy CA's directory (pca init)"
        )
        return command

    authorize = pca_command(
        "authorize",
        "a one-time token that lets HOST enroll",
        "Print a one-time enrollment token for HOST, for `securemig host init "
        "--enroll-token` on that host.  It is shown once (the PCA keeps only its "
        "SHA-256), is spent by the first enrollment it authorizes, and expires.",
    )
    authorize.add_argument("host", help="the host name it lets enroll")
    authorize.add_argument(
        "--expires",
        default=f"{TOKEN_TTL / 3600:g}h",
        help="how long it is valid: seconds, or with a unit s, m, h, d (default %(default)s; "
        f"at most {MAX_TOKEN_TTL / 86400:g}d)",
    )
    authorize.set_defaults(func=cmd_pca_authorize)
    replace = pca_command(
        "replace",
        "let HOST enroll again with another TPM",
        "For a host whose TPM was replaced: revoke every AK certificate of HOST and "
        "forget its EK, so that its next enrollment (authorized as any: its site-CA "
        "TLS certificate or a token) may come from another TPM.",
    )
    replace.add_argument("host")
    replace.set_defaults(func=cmd_pca_replace)
    revoke = pca_command(
        "revoke",
        "revoke HOST's AK certificates (all, or --ak)",
        "Put HOST's AK certificates (all of them, or those of one AK) on the privacy "
        "CA's signed revocation list (GET /v1/crl), which destinations and sources "
        "fetch every --crl-refresh seconds and then refuse those AKs.  After revoking "
        "all, the host enrolls again only with a new authorization.",
    )
    revoke.add_argument("host")
    revoke.add_argument("--ak", help="the AK's name, or its start, in hex (as pca list shows)")
    revoke.set_defaults(func=cmd_pca_revoke)
    listing = pca_command(
        "list",
        "the enrolled hosts, their EKs, AKs, expiry and revocation",
        "List every enrolled host: its EK (SHA-256 of its EK certificate), and each "
        "AK certificate it was given: AK name, serial, when issued, when it expires, "
        "whether it is revoked.",
    )
    listing.add_argument("--json", action="store_true", help="as JSON")
    listing.set_defaults(func=cmd_pca_list)

    host = subparsers.add_parser("host", help="set up this host's identity")
    host_sub = host.add_subparsers(dest="host_command", required=True, metavar="ACTION")
    host_init = host_sub.add_parser(
        "init",
        help="TLS identity, attestation key and its certificate, in DIR",
        description="Create this host's TLS key and certificate from the site CA, an "
        "attestation key in its TPM, and enroll it with the privacy CA.",
    )
    host_init.add_argument("--dir", type=Path, required=True)
    host_init.add_argument("--name", required=True, help="this host's DNS name")
    host_init.add_argument(
        "--tpm", required=True, help="TCTI: device:/dev/tpmrm0, or swtpm:host=127.0.0.1,port=N"
    )
    host_init.add_argument(
        "--site-ca", type=Path, required=True, help="the site CA directory (securemig ca init)"
    )
    host_init.add_argument("--pca", required=True, help="the privacy CA's https:// URL")
    host_init.add_argument(
        "--pca-ca", type=Path, required=True, help="the privacy CA's certificate (its ca.pem)"
    )
    host_init.add_argument(
        "--force",
        action="store_true",
        help="replace an existing identity in DIR (kept aside as DIR.old-TIMESTAMP, "
        "its policy/ too)",
    )
    host_init.add_argument(
        "--enroll-token",
        help="a token from `securemig pca authorize NAME` (needed when the privacy CA "
        "does not trust the site CA's TLS certificates)",
    )
    host_init.add_argument(
        "--ak",
        choices=sorted(AK_TEMPLATES),
        default="ecc",
        help="the attestation key: ECC P-256 with ECDSA, RSA-2048 with RSASSA, or "
        "RSA-2048 with RSASSA-PSS (default %(default)s; host renew keeps it)",
    )
    host_init.add_argument(
        "--ek",
        choices=EK_KINDS,
        default="rsa",
        help="the TPM's endorsement key to enroll with: RSA-2048 or ECC P-256 "
        "(default %(default)s; host renew keeps it)",
    )
    host_init.add_argument(
        "--ek-chain",
        type=Path,
        help="the TPM vendor's intermediate CA certificates (PEM) between its EK "
        "certificate and the vendor root the privacy CA trusts; sent with each enrollment",
    )
    host_init.set_defaults(func=cmd_host_init)
    host_renew = host_sub.add_parser(
        "renew",
        help="a new attestation key and TLS certificate for this host, in place",
        description="Give the host of an identity directory a new attestation key, "
        "enrolled with the privacy CA (a new AK certificate), and a new TLS key and "
        "certificate from the site CA; same name, same TPM.  The new identity replaces "
        "the old one in one rename, the old one is kept as DIR.old-TIMESTAMP; peers' "
        "golden values (DIR/policy) stay.  Restart `twistd securemig` to serve the new "
        "TLS certificate.",
    )
    host_renew.add_argument(
        "--identity", type=Path, required=True, help="the identity directory (host init --dir)"
    )
    host_renew.add_argument(
        "--site-ca", type=Path, required=True, help="the site CA directory (securemig ca init)"
    )
    host_renew.add_argument("--pca", required=True, help="the privacy CA's https:// URL")
    host_renew.add_argument(
        "--pca-ca", type=Path, help="the privacy CA's certificate (default: IDENTITY/pca.pem)"
    )
    host_renew.set_defaults(func=cmd_host_renew)


def cmd_ca_init(args: argparse.Namespace) -> int:
    """``securemig ca init``: a new site CA in a directory that holds none."""
    if (args.dir / "ca.key").exists():
        return error(f"{args.dir} already holds a CA")
    try:
        Authority.create(args.name).save(args.dir)
    except OSError as e:
        return error(f"cannot create a CA in {args.dir}: {describe(e)}")
    print(f"created site CA {args.name!r} in {args.dir}")
    return EXIT_OK


def cmd_ca_issue(args: argparse.Namespace) -> int:
    """``securemig ca issue``: a host's TLS key and certificate from the site CA."""
    try:
        check_host_name(args.name)
    except ValueError as e:
        return usage_error(f"--name: {e}")
    try:
        authority = Authority.load(args.dir)
    except OSError as e:
        return error(
            f"cannot load the CA in {args.dir}: {describe(e)} (securemig ca init makes one)"
        )
    except ValueError as e:
        return error(f"cannot load the CA in {args.dir}: {e}")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        issue_tls(authority, args.name, args.out)
    except OSError as e:
        return error(f"cannot write the TLS key and certificate into {args.out}: {describe(e)}")
    except ValueError as e:
        return usage_error(f"cannot issue a certificate for {args.name!r}: {e}")
    print(f"issued {args.out / 'tls.pem'} for {args.name}")
    return EXIT_OK


def cmd_pca_init(args: argparse.Namespace) -> int:
    """``securemig pca init``: a new privacy CA trusting the given TPM-vendor CAs."""
    if (args.dir / "ca.key").exists():
        return error(f"{args.dir} already holds a privacy CA")
    if args.dir.exists() and not args.dir.is_dir():
        return error(f"cannot create a privacy CA in {args.dir}: it is not a directory")
    if args.tls_name and not (args.site_ca and args.site_ca.is_dir()):
        return usage_error("--tls-name needs --site-ca DIR (the site CA's directory, with its key)")
    if args.tls_name:
        try:
            check_host_name(args.tls_name)
        except ValueError as e:
            return usage_error(f"--tls-name: {e}")
    vendor_cas = []
    for given in args.vendor_ca:
        if given.is_dir():
            found = certificates_in(given)
            if not found:
                return error(f"no certificate in the *.pem files of {given}")
            vendor_cas += found
        elif given.is_file():
            vendor_cas.append(given)
        else:
            return error(f"no such vendor CA certificate: {given}")
    site = None
    site_pem = None
    if args.site_ca is not None and args.site_ca.is_dir():
        try:
            site = Authority.load(args.site_ca)
        except (OSError, ValueError) as e:
            reason = describe(e) if isinstance(e, OSError) else str(e)
            return error(f"cannot load the site CA in {args.site_ca}: {reason}")
        site_pem = args.site_ca / "ca.pem"
    elif args.site_ca is not None:
        if not args.site_ca.is_file():
            return error(f"no such site CA certificate: {args.site_ca}")
        site_pem = args.site_ca
    try:
        PrivacyCA.init(args.dir, vendor_cas, site_ca=site_pem)
    except VendorCAError as e:
        return error(f"{e} (nothing was created)")
    print(
        f"created privacy CA in {args.dir} trusting {len(vendor_cas)} vendor CA(s)"
        + (f"; TLS certificates of {site_pem} authorize enrollments" if site_pem else "")
    )
    if site is not None and args.tls_name:
        issue_tls(site, args.tls_name, args.dir)
        print(f"issued {args.dir / 'tls.pem'} for {args.tls_name} (its HTTPS certificate)")
    return EXIT_OK


#: Units of ``pca authorize --expires``.
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``90``, ``30m``, ``24h``, ``7d`` in seconds; ValueError otherwise."""
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration (e.g. 3600, 30m, 24h, 7d)") from None
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def _open_pca(directory: Path) -> PrivacyCA:
    """The privacy CA in ``directory``; a directory that is not one (a site
    CA's also holds ``ca.key``) is refused before anything is written there."""
    if not (directory / "ca.key").is_file() or not (directory / "pca.sqlite").is_file():
        kind = " (it holds a CA, but no pca.sqlite: a site CA?)" * (directory / "ca.key").exists()
        raise CommandError(
            f"{directory} is not a privacy CA{kind}; give the directory `securemig pca init` made"
        )
    return PrivacyCA(directory)


def cmd_pca_authorize(args: argparse.Namespace) -> int:
    """``securemig pca authorize``: print a one-time enrollment token."""
    try:
        ttl = duration(args.expires)
        check_host_name(args.host)
    except ValueError as e:
        return usage_error(f"{e}")
    if ttl > MAX_TOKEN_TTL:
        return usage_error(f"--expires: at most {MAX_TOKEN_TTL / 86400:g}d")
    token = _open_pca(args.dir).authorize(args.host, ttl)
    until = datetime.fromtimestamp(time.time() + ttl, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(token)
    print(
        f"securemig: one enrollment of {args.host} until {until}: "
        f"securemig host init --name {args.host} --enroll-token TOKEN ... "
        "(this token is not shown again)",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_pca_replace(args: argparse.Namespace) -> int:
    """``securemig pca replace``: let a host enroll with another TPM."""
    try:
        revoked = _open_pca(args.dir).replace(args.host)
    except KeyError:
        return error(f"host {args.host} is not enrolled (securemig pca list)")
    print(
        f"host {args.host} may now enroll with another TPM (authorized: its site-CA TLS "
        f"certificate or `securemig pca authorize {args.host}`); "
        f"{revoked} AK certificate(s) revoked"
    )
    return EXIT_OK


def cmd_pca_revoke(args: argparse.Namespace) -> int:
    """``securemig pca revoke``: put a host's AK certificates on the CRL."""
    if args.ak is not None and (
        not args.ak or not all(c in "0123456789abcdef" for c in args.ak.lower())
    ):
        return usage_error(
            f"--ak {args.ak!r} is not an AK name: give its name, or its start, in hex "
            "(securemig pca list shows them); without --ak, every AK of the host is revoked"
        )
    pca = _open_pca(args.dir)
    if args.host not in {h.host for h in pca.hosts()}:
        return error(f"host {args.host} is not enrolled (securemig pca list)")
    try:
        revoked = pca.revoke(args.host, args.ak)
    except KeyError:
        return error(f"host {args.host} has no AK {args.ak} (securemig pca list)")
    what = f"AK {args.ak} of {args.host}" if args.ak else f"every AK of {args.host}"
    print(
        f"revoked {what} ({revoked} certificate(s) newly revoked); peers refuse it once "
        "they fetch the revocation list (their --crl-refresh)"
    )
    return EXIT_OK


def _when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M")


def cmd_pca_list(args: argparse.Namespace) -> int:
    """``securemig pca list``: enrolled hosts, EKs, AKs, expiry, revocation."""
    hosts = _open_pca(args.dir).hosts()
    if args.json:
        print(json.dumps([dataclasses.asdict(h) for h in hosts], indent=2))
        return EXIT_OK
    if not hosts:
        print("no host is enrolled")
    for h in hosts:
        ek = f"EK {h.ek[:16]}" if h.ek else "EK (replaced: the next enrollment binds one)"
        print(f"{h.host}  {ek}" + (f"  REVOKED {_when(h.revoked)}" if h.revoked else ""))
        for ak in h.aks:
            state = f"REVOKED {_when(ak.revoked)}" if ak.revoked else "valid"
            print(
                f"  AK {ak.ak_name[:16]}  serial {ak.serial[:16]}  issued {_when(ak.enrolled)}"
                f"  expires {_when(ak.not_after)}  {state}"
            )
    return EXIT_OK


def certificates_in(directory: Path) -> list[Path]:
    """The ``*.pem`` files of ``directory`` that hold a certificate (not
    the keys beside them), in name order."""
    return [
        p
        for p in sorted(directory.glob("*.pem"))
        if p.is_file() and b"-----BEGIN CERTIFICATE-----" in p.read_bytes()[: 1 << 16]
    ]


def _missing_input(args: argparse.Namespace, e: FileNotFoundError) -> str:
    """A file ``host init`` reads that is not there, said as what the
    operator named (not an errno naming a file inside it)."""
    missing = Path(e.filename or "")
    if e.filename and missing.parent == args.site_ca:
        return (
            f"--site-ca {args.site_ca}: not a site CA directory (no {missing.name} there; "
            "securemig ca init makes one)"
        )
    if missing == args.pca_ca:
        return (
            f"--pca-ca {args.pca_ca}: no such file (the privacy CA's certificate, PCA_DIR/ca.pem)"
        )
    return describe(e)


def cmd_host_init(args: argparse.Namespace) -> int:
    """``securemig host init``: this host's TLS identity and attestation key,
    enrolled with the privacy CA; refuses an existing identity without
    ``--force``."""
    earlier = set(kept_aside(args.dir))
    if args.ek_chain is not None:
        try:
            check_vendor_ca(args.ek_chain)
        except VendorCAError as e:
            return error(f"--ek-chain: {e}")
    try:
        identity = init_host(
            args.dir,
            args.name,
            args.tpm,
            args.site_ca,
            args.pca,
            args.pca_ca,
            force=args.force,
            token=args.enroll_token,
            ak_alg=args.ak,
            ek_kind=args.ek,
            ek_chain=args.ek_chain,
        )
    except IdentityExists as e:
        return error(str(e))
    except EnrollmentRefused as e:
        return error(f"the privacy CA refused the enrollment: {e}")
    except FileNotFoundError as e:
        return error(_missing_input(args, e))
    except (TPMError, OSError, ValueError) as e:
        return error(str(e))
    replaced = sorted(set(kept_aside(identity.directory)) - earlier)
    print(
        f"host {identity.name} initialised in {identity.directory}: TLS certificate, "
        "attestation key, AK certificate"
        + (f"; the identity it replaced is in {replaced[0]}" if replaced else "")
    )
    return EXIT_OK


def cmd_host_renew(args: argparse.Namespace) -> int:
    """``securemig host renew``: a new AK (and AK certificate) and a new TLS
    key and certificate, swapped in atomically."""
    if not (args.identity / "host.json").is_file():
        return error(f"{args.identity} is not an identity directory (securemig host init)")
    earlier = set(kept_aside(args.identity))
    try:
        identity = renew_host(args.identity, args.site_ca, args.pca, args.pca_ca)
    except EnrollmentRefused as e:
        return error(f"the privacy CA refused the enrollment: {e} (the identity is unchanged)")
    except KeyError as e:
        return error(f"{args.identity}/host.json lacks {e}")
    except (TPMError, OSError, ValueError) as e:
        return error(str(e))
    ak, _ = identity.attestation_key()
    print(
        f"host {identity.name} renewed in {identity.directory}: new attestation key "
        f"{ak_name(ak.public).hex()[:16]} and its certificate, new TLS certificate; "
        f"the old identity is in {sorted(set(kept_aside(identity.directory)) - earlier)[0]}. "
        "Restart `twistd securemig` to serve the new TLS certificate."
    )
    return EXIT_OK
