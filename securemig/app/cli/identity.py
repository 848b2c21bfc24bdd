"""``securemig ca``, ``securemig pca`` and ``securemig host``: the site CA,
the privacy CA and a host's identity (TLS, attestation key)."""

from __future__ import annotations

import argparse
from pathlib import Path

from securemig.app.cli.common import EXIT_OK, Subparsers, describe, error, usage_error
from securemig.trust.attest import ak_name
from securemig.trust.identity import IdentityExists, init_host, issue_tls, kept_aside, renew_host
from securemig.trust.pca.client import EnrollmentRefused
from securemig.trust.pca.core import PrivacyCA, VendorCAError
from securemig.trust.pki import Authority, check_host_name
from securemig.trust.tpm.tpm import TPMError


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
        "from --site-ca, into DIR/tls.key and DIR/tls.pem (twistd securemig-pca uses them)",
    )
    pca_init.add_argument("--site-ca", type=Path, help="the site CA's directory, for --tls-name")
    pca_init.set_defaults(func=cmd_pca_init)

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
    if bool(args.tls_name) != bool(args.site_ca):
        return usage_error("--tls-name and --site-ca go together")
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
    if args.site_ca:
        try:
            site = Authority.load(args.site_ca)
        except (OSError, ValueError) as e:
            reason = describe(e) if isinstance(e, OSError) else str(e)
            return error(f"cannot load the site CA in {args.site_ca}: {reason}")
    try:
        PrivacyCA.init(args.dir, vendor_cas)
    except VendorCAError as e:
        return error(f"{e} (nothing was created)")
    print(f"created privacy CA in {args.dir} trusting {len(vendor_cas)} vendor CA(s)")
    if site is not None:
        issue_tls(site, args.tls_name, args.dir)
        print(f"issued {args.dir / 'tls.pem'} for {args.tls_name} (its HTTPS certificate)")
    return EXIT_OK


def certificates_in(directory: Path) -> list[Path]:
    """The ``*.pem`` files of ``directory`` that hold a certificate (not
    the keys beside them), in name order."""
    return [
        p
        for p in sorted(directory.glob("*.pem"))
        if p.is_file() and b"-----BEGIN CERTIFICATE-----" in p.read_bytes()[: 1 << 16]
    ]


def cmd_host_init(args: argparse.Namespace) -> int:
    """``securemig host init``: this host's TLS identity and attestation key,
    enrolled with the privacy CA; refuses an existing identity without
    ``--force``."""
    earlier = set(kept_aside(args.dir))
    try:
        identity = init_host(
            args.dir, args.name, args.tpm, args.site_ca, args.pca, args.pca_ca, force=args.force
        )
    except IdentityExists as e:
        return error(str(e))
    except EnrollmentRefused as e:
        return error(f"the privacy CA refused the enrollment: {e}")
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
