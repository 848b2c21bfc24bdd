# Two commands do everything on a fresh Debian machine: `make demo`, `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.securemig-setup
TESTS  ?= tests
# The packages held to mypy --strict (doc/architecture.rst).
STRICT := securemig/protocol securemig/host securemig/transport
# The Linux guest (Debian kernel + busybox-static), built once, cached here.
GUEST  := .cache/guest/initrd.cpio

.PHONY: setup demo test lint docs bench clean install-units

setup: $(STAMP) $(GUEST)

$(GUEST): $(STAMP) securemig/hypervisor/guest.py
	$(PY) -m securemig.hypervisor.guest

$(STAMP): pyproject.toml scripts/setup-debs.sh
	./scripts/setup-debs.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# An editable install (PEP 660) that is a .pth file naming this directory
	# (pyproject.toml, package-dir), so twistd finds twisted/plugins/ on sys.path.
	$(PY) -m pip install -q -e '.[test]'
	# Wheels of the dependencies, for the wheel test's fresh venv (offline).
	$(PY) -m pip wheel -q --wheel-dir $(VENV)/wheelhouse .
	# Refresh Twisted's plugin cache so `twistd securemig` is listed at once.
	$(PY) -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/securemig demo

test: setup
	$(VENV)/bin/ruff check securemig tests twisted
	$(VENV)/bin/mypy securemig
	# The sans-IO layer, the host rules and the Twisted shell are held to
	# --strict (doc/architecture.rst).
	$(VENV)/bin/mypy --strict $(STRICT)
	$(MAKE) --no-print-directory docs
	$(VENV)/bin/trial -j2 $(TESTS)

lint: setup
	$(VENV)/bin/ruff check securemig tests twisted
	$(VENV)/bin/ruff format --check securemig tests twisted
	$(VENV)/bin/mypy securemig
	$(VENV)/bin/mypy --strict $(STRICT)

# The rendered documentation; a warning (a broken table, a command reference
# that no longer builds) fails it.
docs: setup
	$(VENV)/bin/sphinx-build -q -W --keep-going -b html doc doc/_build/html

bench: setup
	$(VENV)/bin/securemig bench --out bench-out

# The systemd units of contrib/systemd, running this checkout's twistd:
# make install-units [DESTDIR=/some/root] [UNITDIR=/etc/systemd/system]
UNITDIR ?= /etc/systemd/system
SYSUSERSDIR ?= /etc/sysusers.d
install-units: setup
	install -d $(DESTDIR)$(UNITDIR)
	for unit in contrib/systemd/*.service; do \
	  sed 's|/opt/securemig/.venv|$(abspath $(VENV))|' $$unit > $(DESTDIR)$(UNITDIR)/$$(basename $$unit) && \
	  chmod 644 $(DESTDIR)$(UNITDIR)/$$(basename $$unit) || exit 1; \
	done
	install -d $(DESTDIR)$(SYSUSERSDIR)
	install -m 644 contrib/systemd/securemig.sysusers $(DESTDIR)$(SYSUSERSDIR)/securemig.conf
	@echo "installed in $(DESTDIR)$(UNITDIR); then: systemd-sysusers && systemctl daemon-reload && systemctl enable --now securemig"

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info doc/_build
