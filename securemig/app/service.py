"""
``twistd securemig``: the destination service.

Builds the listening service from command-line options; the plugin in
``twisted/plugins/securemig_plugin.py`` points twistd here.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python import usage

from securemig import files, runtime
from securemig.app import config, logformat
from securemig.app.control import ControlService
from securemig.app.metrics_service import metrics_site
from securemig.host import storage
from securemig.host.arrival import DestinationHost
from securemig.host.glibc import tune_malloc
from securemig.hypervisor import backends
from securemig.transport import tls
from securemig.transport.control import DEADLINE, IDLE_TIMEOUT
from securemig.transport.destination import DestinationFactory
from securemig.transport.limits import (
    HANDSHAKE_TIMEOUT,
    Caps,
    LimitedTLSFactory,
    raise_descriptor_limit,
)
from securemig.transport.options import DestinationOptions
from securemig.transport.resolve import Resolver
from securemig.transport.tcp import listen_in_range, parse_port_range
from securemig.transport.tls import CIPHERS
from securemig.trust.attestor import open_attestor
from securemig.trust.identity import Identity
from securemig.trust.keyrelease import DestinationSecurity, MigrationKey
from securemig.trust.revocation import CRL_MAX_AGE, CRL_REFRESH, CRLError, RevocationList
from securemig.trust.revocation import for_identity as revocation_for

log = Logger()
#: The global reactor, untyped (Twisted declares it through zope interfaces).
reactor: Any = _reactor


#: The exit statuses of ``twistd securemig`` and ``twistd securemig-pca``,
#: as the end of their ``--help`` lists them.
EXIT_STATUS_HELP = """\
exit status:
  0  stopped by SIGTERM or Ctrl-C (SIGINT)
  1  did not start: a usage error (the last line says which), or a state
     directory it cannot use or a port it cannot bind (logged as CRITICAL)
"""


class ServiceOptions(usage.Options):
    """Options of a securemig twistd service: its ``--help`` ends with
    :data:`EXIT_STATUS_HELP`, as written (twistd rewraps ``longdesc``)."""

    # Both services' (twistd gathers optParameters along the class tree).
    optParameters: list[list[Any]] = [logformat.OPTION]

    def getUsage(self, width: int | None = None) -> str:
        """twistd's usage text, then the exit statuses."""
        return super().getUsage(width) + "\n" + EXIT_STATUS_HELP

    #: The option naming the service's own directory (its pidfile goes there).
    directory_option = "state-dir"

    def postOptions(self) -> None:
        """The options both services share: ``--log-format``; and twistd's
        pidfile, unless ``--pidfile`` was given, in the service's directory
        instead of the working directory (two services started from one
        directory would refuse each other over ``./twistd.pid``)."""
        logformat.choose(self)
        parent: Any = getattr(self, "parent", None)
        directory = self[self.directory_option]
        if parent is not None and directory and parent.get("pidfile") == "twistd.pid":
            parent["pidfile"] = str(Path(directory).absolute() / "twistd.pid")


class Options(ServiceOptions):
    """Command-line options of ``twistd securemig``."""

    synopsis = "--state-dir DIR --insecure-listen ENDPOINT [options]"
    longdesc = (
        "Run a securemig destination: accept migrations of VMs into STATE_DIR/vms/. "
        "The secure variant (mutual TLS, attestation) listens with --listen; the "
        "insecure variant, for performance evaluation only, with --insecure-listen "
        "(for example tcp:9000:interface=127.0.0.1)."
    )
    optParameters = [
        [
            "config",
            None,
            None,
            f"The configuration file ([service] and [paths]; default: ${config.CONFIG_ENV}, "
            f"else {config.DEFAULT_PATH} if it exists); options given here override it.",
        ],
        ["state-dir", None, None, "Directory for arrived VMs, staging and the journal."],
        [
            "listen",
            None,
            None,
            "Endpoint of the secure variant, e.g. tcp:9000 (mutual TLS 1.3 is added here).",
        ],
        ["identity", None, None, "This host's identity directory (securemig host init)."],
        ["policy-dir", None, None, "Golden values of sources (default: IDENTITY/policy)."],
        [
            "insecure-listen",
            None,
            None,
            "Endpoint of the INSECURE variant: no TLS, no attestation, vTPM keys in clear.",
        ],
        ["port-file", None, None, "Write the (secure, else insecure) port number here."],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics (GET /metrics) on this endpoint, e.g. "
            "tcp:9464:interface=127.0.0.1 (no authentication: loopback or a management "
            "network); off by default.",
        ],
        ["insecure-port-file", None, None, "Write the insecure port number here."],
        [
            "idle-timeout",
            None,
            IDLE_TIMEOUT,
            "Seconds without progress before a migration is aborted.",
            float,
        ],
        ["deadline", None, DEADLINE, "Seconds a whole migration may take.", float],
        [
            "resolve-interval",
            None,
            5.0,
            "Seconds between rounds of settling this host's own unfinished departures "
            "(its STATE_DIR journal is also the journal of `securemig migrate --state-dir`).",
            float,
        ],
        [
            "handshake-timeout",
            None,
            HANDSHAKE_TIMEOUT,
            "Secure variant: seconds a connection has to complete its TLS handshake "
            "(as OpenSSH's LoginGraceTime).",
            float,
        ],
        [
            "max-startups",
            None,
            None,
            "Secure variant: START:RATE:FULL for connections not yet through the TLS "
            "handshake: above START, each new one closes the oldest pending one with "
            "probability RATE %, rising to 100 % at FULL (default: derived from the "
            "descriptor limit, FULL = a quarter of it, at most 1000; START = FULL/2; RATE 30).",
        ],
        [
            "per-source-max-startups",
            None,
            None,
            "Secure variant: at most this many connections from one address before "
            "their TLS handshake completes; more are refused at once (default: FULL/10, "
            "at least 4).",
            int,
        ],
        [
            "data-ports",
            None,
            None,
            "Secure variant: LOW-HIGH, the ports a migration's data channel may listen on "
            "(for firewalls; default: any free port). A migration finding all taken fails.",
        ],
        [
            "crl",
            None,
            None,
            "The privacy CA's https:// URL to fetch its revocation list (/v1/crl) from "
            "(default: the one IDENTITY enrolled with).",
        ],
        [
            "crl-refresh",
            None,
            CRL_REFRESH,
            "Seconds between fetches of the privacy CA's revocation list.",
            float,
        ],
        [
            "crl-max-age",
            None,
            CRL_MAX_AGE,
            "Seconds after its signing past which the revocation list held is stale "
            "and every source is refused (fail closed).",
            float,
        ],
        [
            "backend",
            None,
            backends.DEFAULT,
            "Hypervisor backend of this host: "
            + ", ".join(backends.kinds())
            + " (image: files only).",
        ],
        [
            "tls-cipher",
            None,
            None,
            "Secure variant: only this TLS 1.3 cipher suite "
            "(aes128, aes256, chacha20; default: OpenSSL's choice).",
        ],
    ]
    optFlags = [
        ["tofu", None, "Record an unknown source's PCR values on its first attestation."],
        [
            "tls-data",
            None,
            "Secure variant: stream images inside the TLS connection instead of on a data "
            "channel (a second TCP connection per migration, to a free port announced in "
            "WELCOME, with AEAD records keyed from the TLS session; much faster).",
        ],
    ]

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse, keeping the command line to tell which options it gave
        (those override the configuration file)."""
        self.command_line = list(options or [])
        super().parseOptions(options)

    def apply_config(self) -> None:
        """The configuration file's ``[service]`` and ``[paths]`` values, for
        the options the command line did not give."""
        try:
            loaded = config.load(self["config"])
        except config.ConfigError as e:
            raise usage.UsageError(str(e)) from None
        words = {w[2:].partition("=")[0] for w in self.command_line if w.startswith("--")}
        for name, value in loaded.defaults_for("service").items():
            # twistd (getopt) takes unambiguous prefixes of long options.
            if any(w and name.startswith(w) for w in words):
                continue
            if name == "allow-source":
                self[name] = list(value)
            elif isinstance(value, bool):
                self[name] = int(value)
            elif isinstance(value, Path):
                self[name] = str(value)
            else:
                self[name] = value

    def opt_allow_source(self, name: str) -> None:
        """Accept secure migrations only from this source name (repeatable)."""
        self.setdefault("allow-source", []).append(name)

    def postOptions(self) -> None:
        """Check the options make a usable destination."""
        self.apply_config()
        super().postOptions()
        if not self["state-dir"]:
            raise usage.UsageError("--state-dir is required")
        # One daemon per state directory: a second one would settle (and
        # delete) the staging of migrations arriving at the first.  Held for
        # the life of the process (a flock survives twistd's fork).
        state = Path(self["state-dir"])
        try:
            state.mkdir(parents=True, exist_ok=True)
            self.lock = storage.Lock(state / DAEMON_LOCK)
        except storage.LockBusy:
            holder = (state / DAEMON_LOCK).read_text().strip()
            raise usage.UsageError(
                f"another twistd securemig (pid {holder or '?'}) runs on {state}"
            ) from None
        except OSError as e:
            raise usage.UsageError(f"cannot use --state-dir {state}: {e.strerror or e}") from None
        try:
            runtime.private(runtime.for_state_dir(state))
        except runtime.NotPrivate as e:
            raise usage.UsageError(str(e)) from None
        if self["listen"] and not self["identity"]:
            raise usage.UsageError("--listen (the secure variant) needs --identity DIR")
        if self["identity"] and not (Path(self["identity"]) / "host.json").exists():
            raise usage.UsageError(
                f"{self['identity']} is not an identity directory (securemig host init)"
            )

        if self["tls-cipher"] and self["tls-cipher"] not in CIPHERS:
            raise usage.UsageError(f"unknown --tls-cipher; one of {', '.join(CIPHERS)}")
        if self["backend"] not in backends.kinds():
            raise usage.UsageError(
                f"unknown --backend {self['backend']}: {', '.join(backends.kinds())}"
            )
        if not self["listen"] and not self["insecure-listen"]:
            raise usage.UsageError(
                "give an endpoint to listen on: --listen ENDPOINT "
                "(secure) and/or --insecure-listen ENDPOINT"
            )
        for option in ("listen", "insecure-listen"):
            if self[option]:
                check_endpoint(option, self[option])
        if self["max-startups"]:
            try:
                self.startups: tuple[int, int, int] | None = Caps.parse_startups(
                    self["max-startups"]
                )
            except ValueError as e:
                raise usage.UsageError(f"--max-startups {self['max-startups']!r}: {e}") from None
        else:
            self.startups = None
        self.data_ports: range | None = None
        if self["data-ports"]:
            try:
                self.data_ports = parse_port_range(self["data-ports"])
            except ValueError as e:
                raise usage.UsageError(f"--data-ports {self['data-ports']!r}: {e}") from None
        if self["per-source-max-startups"] is not None and self["per-source-max-startups"] < 1:
            raise usage.UsageError("--per-source-max-startups must be at least 1")
        # The validators securemig migrate shares (app/config.py): one sentence each.
        for option in ("handshake-timeout", "idle-timeout", "deadline", "resolve-interval", "crl"):
            if problem := config.refusal_of("service", option, self[option]):
                raise usage.UsageError(problem)
        for option in ("crl-refresh", "crl-max-age"):
            if problem := config.refusal(option, self[option], config.positive):
                raise usage.UsageError(problem)


def check_endpoint(option: str, description: str) -> None:
    """Refuse an endpoint string twistd could not listen on (``9000``
    without ``tcp:``, a port that is no number) as a usage error, before
    anything starts."""
    try:
        serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError) as e:
        raise usage.UsageError(
            f"--{option} {description!r} is not an endpoint ({e}); "
            "write it as tcp:PORT or tcp:PORT:interface=ADDRESS, e.g. tcp:9000"
        ) from None


#: Held by the daemon in its state directory (see Options.postOptions).
DAEMON_LOCK = "daemon.lock"


class RecoveryService(service.Service):
    """This host's recovery, both roles: at start, redo what each unfinished
    arrival journaled (roll a journaled COMMIT forward, hold a PREPARED one
    in doubt); then, as the coordinator of its own departures, settle them
    and send each destination the RESOLVE it is owed, every ``interval``
    seconds, until it confirms."""

    def __init__(self, host: DestinationHost, interval: float) -> None:
        self.host = host
        self.interval = interval
        self.identity: Path | None = None
        self.resolver: Resolver | None = None
        #: Arrivals held in doubt because their hypervisor did not answer,
        #: asked again every interval (DestinationHost.recheck_held).
        self.recheck = LoopingCall(self._recheck)

    def startService(self) -> None:
        """Recover arrivals, then start the resolver."""
        super().startService()

        def report(actions: list[tuple[str, str]]) -> None:
            for mid, what in actions:
                log.info("recovery of migration {mid}: {what}", mid=mid, what=what)

        def failed(f: Any) -> None:
            log.failure("recovery of unfinished arrivals failed", f)

        def clean(_: object) -> None:
            # After recovery, which ended what it settled: what is left in the
            # runtime directory and held by no running program is what a
            # killed process (this daemon, a migrate, a QEMU) left behind.
            run = runtime.for_state_dir(self.host.state_dir)
            try:
                removed = runtime.clean(run)
            except OSError as e:
                log.error("cleaning {run} failed: {e}", run=str(run), e=e)
                return
            if removed:
                log.info(
                    "removed {n} runtime files no program holds from {run}",
                    n=len(removed),
                    run=str(run),
                )

        def resolve(_: object) -> None:
            if self.running:
                self.resolver = Resolver(
                    reactor, self.host.journal, self.identity, self.host.unseal, self.interval
                )
                self.resolver.start()
                self.recheck.start(self.interval, now=False)

        d = Deferred.fromCoroutine(self.host.recover())
        d.addCallbacks(report, failed).addBoth(clean).addBoth(resolve)

    def _recheck(self) -> Any:
        """Arrivals held because their hypervisor did not answer: asked again."""

        def report(actions: list[tuple[str, str]]) -> None:
            for mid, what in actions:
                log.info("recovery of migration {mid}: {what}", mid=mid, what=what)

        d = Deferred.fromCoroutine(self.host.recheck_held())
        d.addCallbacks(report, lambda f: log.warn("rechecking held arrivals: {e}", e=f.value))
        return d

    def stopService(self) -> Any:
        """No more resolver rounds; the runtime directory goes if nothing is
        in it (twistd ends itself with its signal: no atexit runs)."""
        super().stopService()
        if self.resolver is not None:
            self.resolver.stop()
        if self.recheck.running:
            self.recheck.stop()
        runtime.remove_if_empty(runtime.for_state_dir(self.host.state_dir))
        return None


class RevocationService(service.Service):
    """Fetch the privacy CA's revocation list every ``interval`` seconds (in
    a thread: it is a blocking HTTPS request); a failed fetch keeps the list
    held, which fails closed once it is older than its max age."""

    def __init__(self, revocation: RevocationList, interval: float) -> None:
        self.revocation = revocation
        self.loop = LoopingCall(self._fetch)
        self.interval = interval
        self._said: str | None = None

    def startService(self) -> None:
        """The first fetch now, in this thread, so that the first source is
        judged by a current list; then every interval."""
        super().startService()
        try:
            self.revocation.fetch()
        except CRLError as e:
            self._report(str(e))
        self.loop.start(self.interval, now=False)

    def _fetch(self) -> Any:
        d = deferToThread(self.revocation.fetch)
        d.addCallbacks(lambda _: self._report(None), lambda f: self._report(f.getErrorMessage()))
        return d

    def _report(self, problem: str | None) -> None:
        # Each change is logged once, not every round.
        if problem == self._said:
            return
        self._said = problem
        if problem is None:
            log.info("revocation list from {url} fetched", url=self.revocation.url)
        else:
            log.warn(
                "revocation list: {problem}; keeping the one held (sources are refused "
                "once it is older than --crl-max-age)",
                problem=problem,
            )

    def stopService(self) -> Any:
        """No more fetches."""
        super().stopService()
        if self.loop.running:
            self.loop.stop()
        return None


class ListenService(service.Service):
    """Listen on one endpoint; optionally report the bound port in a file."""

    def __init__(self, endpoint: Any, factory: Any, port_file: Path | None, what: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.port_file = port_file
        self.what = what
        self.port: Any = None

    def startService(self) -> None:
        """Start listening; a failure to bind stops the process with the reason."""
        super().startService()
        d = self.endpoint.listen(self.factory)

        def listening(port: Any) -> None:
            self.port = port
            number = port.getHost().port
            log.info("listening for {what} on port {port}", what=self.what, port=number)
            if self.port_file is not None:
                files.write_durably(self.port_file, f"{number}\n".encode())

        def failed(f: Any) -> None:
            # A supervisor must see a service that cannot serve as failed.
            log.critical(
                "cannot listen for {what}: {reason}; exiting with status 1",
                what=self.what,
                reason=f.getErrorMessage(),
            )
            reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
            # The bind may fail before the reactor runs (startService): stop
            # it once it does.
            reactor.callWhenRunning(reactor.stop)

        d.addCallbacks(listening, failed)

    def stopService(self) -> Any:
        """Stop listening."""
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


def preauth_caps(options: Options, nofile: int) -> Caps:
    """The pre-authentication caps: derived from the descriptor limit
    ``nofile``, unless the options give them."""
    caps = Caps.from_descriptors(nofile, options["handshake-timeout"])
    start, rate, full = getattr(options, "startups", None) or (caps.start, caps.rate, caps.full)
    per_address = options["per-source-max-startups"] or max(4, full // 10)
    return Caps(start, rate, full, per_address, options["handshake-timeout"])


def makeService(options: Options) -> service.MultiService:
    """The destination service for these options."""
    tune_malloc()
    # Before anything opens a descriptor: a flood of idle sockets must meet
    # the pre-authentication caps, not EMFILE.
    nofile = raise_descriptor_limit()
    log.info("descriptor limit (RLIMIT_NOFILE): {nofile}", nofile=nofile)
    host = DestinationHost(Path(options["state-dir"]), backend=options["backend"])
    # The sockets and links of what this daemon starts (QEMUs, live streams)
    # go to its state directory's runtime directory (securemig.runtime).
    runtime.use(host.state_dir)
    top = service.MultiService()
    recovery = RecoveryService(host, options["resolve-interval"])
    recovery.setServiceParent(top)
    # `securemig migrate --daemon`: local clients ask this daemon to drive
    # their migrations (app/control.py).
    ControlService(host, reactor).setServiceParent(top)
    # What every incoming migration is told, built once; each listener adds its variant's part.
    base = DestinationOptions(idle_timeout=options["idle-timeout"], deadline=options["deadline"])
    port_file = Path(options["port-file"]) if options["port-file"] else None
    attestor = None
    caps: Caps | None = None
    limits = None
    if options["identity"]:
        policy_dir = Path(options["policy-dir"]) if options["policy-dir"] else None
        identity_dir = Path(options["identity"])
        revocation = revocation_for(
            identity_dir,
            options["crl"],
            Identity.load(identity_dir).pca_url,
            options["crl-max-age"],
        )
        if revocation is None:
            log.warn(
                "{identity} names no privacy CA URL: sources' AK certificates are NOT "
                "checked for revocation (give --crl URL, or renew the identity)",
                identity=identity_dir,
            )
        else:
            RevocationService(revocation, options["crl-refresh"]).setServiceParent(top)
        attestor = open_attestor(identity_dir, policy_dir, options["tofu"], revocation=revocation)
        host.unseal = attestor.unseal
        recovery.identity = Path(options["identity"])
    if options["listen"]:
        assert attestor is not None  # postOptions requires --identity with --listen
        identity = Path(options["identity"])
        # Created once, for the PCR state the host has now; certified per session.
        allowed = options.get("allow-source")
        security = DestinationSecurity(
            attestor,
            MigrationKey(attestor.tpm, attestor.pcrs),
            frozenset(allowed) if allowed else None,
        )

        ports = getattr(options, "data_ports", None)

        def data_listener(interface: str, factory: Any) -> Any:
            # Per migration, on the address the source reached: any free
            # port, or one of --data-ports.
            return listen_in_range(reactor, ports, factory, interface)

        secure = DestinationFactory(
            host,
            reactor,
            replace(
                base,
                protocol_name="secure",
                security=security,
                data_listener=None if options["tls-data"] else data_listener,
                live_listener=data_listener,
            ),
        )
        # TLS wraps the factory in code: endpoint strings cannot require client certs.
        server_options: Any = tls.server_options(identity, options["tls-cipher"])
        factory: Any = secure
        wrapped = LimitedTLSFactory(server_options, factory, preauth_caps(options, nofile), reactor)
        caps = wrapped.limits.caps
        limits = wrapped.limits
        log.info(
            "before the TLS handshake: {timeout:g} s to complete it, at most {per} per "
            "address, random drop above {start} (from {rate} %), at most {full}",
            timeout=caps.handshake_timeout,
            per=caps.per_address,
            start=caps.start,
            rate=caps.rate,
            full=caps.full,
        )
        ListenService(
            serverFromString(reactor, options["listen"]),
            wrapped,
            port_file,
            f"secure migrations as {attestor.identity.name}",
        ).setServiceParent(top)
        port_file = None
    if options["insecure-listen"]:
        log.warn(
            "serving the INSECURE variant on {endpoint}: no TLS, no attestation; "
            "for performance evaluation only",
            endpoint=options["insecure-listen"],
        )
        # With an identity, the insecure twin can keep a vTPM key (sent in the clear).
        insecure = DestinationFactory(
            host, reactor, replace(base, protocol_name="insecure", key_keeper=attestor)
        )
        if options["insecure-port-file"]:
            port_file = Path(options["insecure-port-file"])
        ListenService(
            serverFromString(reactor, options["insecure-listen"]),
            insecure,
            port_file,
            "insecure migrations",
        ).setServiceParent(top)
    if options["metrics"]:
        ListenService(
            serverFromString(reactor, options["metrics"]),
            metrics_site(Path(options["state-dir"]), limits),
            None,
            "Prometheus scrapes (/metrics)",
        ).setServiceParent(top)
    log_startup(options, nofile, caps)
    return top


def log_startup(options: Options, nofile: int, caps: Caps | None) -> None:
    """One line that says how this daemon runs: version, backend, trust
    mode, listeners, limits."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("securemig")
    except PackageNotFoundError:
        release = "?"
    trust = []
    if options["listen"]:
        policies = options["policy-dir"] or f"{options['identity']}/policy"
        trust.append(f"secure: mutual TLS + attestation, golden values from {policies}")
        if options["tofu"]:
            trust.append("TRUST ON FIRST USE of unknown sources")
        allowed = options.get("allow-source")
        trust.append(f"sources allowed: {', '.join(allowed) if allowed else 'any of the site CA'}")
    if options["insecure-listen"]:
        trust.append("INSECURE variant served (no TLS, no attestation)")
    listeners = [f"secure {options['listen']}"] if options["listen"] else []
    if options["insecure-listen"]:
        listeners.append(f"insecure {options['insecure-listen']}")
    if options["metrics"]:
        listeners.append(f"metrics {options['metrics']}")
    limits = (
        f"idle {options['idle-timeout']:g} s, deadline {options['deadline']:g} s, "
        f"{nofile} descriptors"
    )
    if caps is not None:
        limits += (
            f", handshake {caps.handshake_timeout:g} s, pending {caps.per_address} per "
            f"address and {caps.full} in all"
        )
    log.info(
        "securemig {release} starting: backend {backend}; trust: {trust}; listening: "
        "{listeners}; state {state}; limits: {limits}",
        release=release,
        backend=options["backend"],
        trust="; ".join(trust),
        listeners=", ".join(listeners) or "none",
        state=options["state-dir"],
        limits=limits,
    )
