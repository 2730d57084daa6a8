# virtwarden — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
# Debian packages the build and the tests need. libvirt0 (pulled in by libvirt-dev) carries
# libvirt's in-process test driver, which `make run` and most tests use; systemd brings
# `systemd-analyze verify` for the unit's test; mmdebstrap, buildah, podman and runc build and
# run the image without a registry (`make image`, controller/tests/e2e_image.rs); isc-dhcp-client
# is the real DHCP client the uplink takeover test runs on a link to prove it is refused (its
# script is /bin/true: it never touches /etc).
DEB_PACKAGES := libvirt-dev pkg-config libvirt-clients gcc iproute2 util-linux \
	libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils cpio gzip \
	iptables nftables acl systemd \
	mmdebstrap buildah podman runc openssl isc-dhcp-client dpkg-dev
TESTBED_URI := test://$(CURDIR)/examples/testbed/node.xml
VIRTWARDEN := target/debug/virtwarden

.PHONY: help deps deps-ops deb test-systemd install-cockpit prometheusrule build run test test-fast bench bench-net bench-e2e bench-apply bench-operator bench-health k8s-testenv fuzz fmt lint lint-core crd schema docs clean

help:
	@echo "make run    build, install missing packages, reconcile the example test-driver host"
	@echo "make test   the whole suite (installs what it needs)"
	@echo "make lint | fmt | bench | bench-operator | fuzz | crd | schema | docs | deps"
	@echo "make deb   target/debian/virtwarden_*.deb (then: apt install ./target/debian/virtwarden_*.deb)"
	@echo "make install-cockpit   the Cockpit page into \$$(DESTDIR)\$$(PREFIX)/share/cockpit/virtwarden"
	@echo "make image  the OCI image (target/image/virtwarden-<version>.oci.tar), no registry needed"

## deps: install missing Debian packages (idempotent; needs root or sudo).
deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "deps: all present"; fi

## deps-ops: what the tests of the operators' views need (alert rules, dashboard, Cockpit page):
## promtool (taken out of Debian's prometheus package into target/tools, so no Prometheus server
## is installed or started), cockpit-ws and cockpit-bridge, Debian's chromium, and Playwright
## (PyPI) in a venv under target/ that drives that chromium (it downloads no browser).
OPS_DEB_PACKAGES := cockpit-ws cockpit-bridge chromium python3-venv
PLAYWRIGHT_VERSION := 1.65.2
TOOLS_DIR := $(CURDIR)/target/tools
PLAYWRIGHT_VENV := $(CURDIR)/target/playwright-venv
deps-ops:
	@missing=""; for p in $(OPS_DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi; \
	if ! [ -x $(TOOLS_DIR)/promtool ]; then \
	  mkdir -p $(TOOLS_DIR)/deb && cd $(TOOLS_DIR)/deb && rm -f prometheus_*.deb && \
	  { apt-get download prometheus 2>/dev/null || { $$SUDO apt-get update -qq && apt-get download prometheus; }; } && \
	  dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x -O ./usr/bin/promtool > $(TOOLS_DIR)/promtool.new && \
	  chmod 755 $(TOOLS_DIR)/promtool.new && mv $(TOOLS_DIR)/promtool.new $(TOOLS_DIR)/promtool && \
	  rm -f prometheus_*.deb && cd $(TOOLS_DIR) && rmdir deb && echo "promtool: $(TOOLS_DIR)/promtool"; \
	fi
	@if ! $(PLAYWRIGHT_VENV)/bin/python -c 'import playwright' 2>/dev/null; then \
	  /usr/bin/python3 -m venv $(PLAYWRIGHT_VENV) && \
	  $(PLAYWRIGHT_VENV)/bin/pip install -q playwright==$(PLAYWRIGHT_VERSION); \
	fi

## install-cockpit: the Cockpit page (cockpit/virtwarden) into Cockpit's package directory.
## Settings (status directory, command, diagnose flags): /etc/cockpit/virtwarden.override.json.
PREFIX ?= /usr
COCKPIT_DIR = $(DESTDIR)$(PREFIX)/share/cockpit/virtwarden
install-cockpit:
	install -d $(COCKPIT_DIR)
	install -m 0644 cockpit/virtwarden/* $(COCKPIT_DIR)/
	@echo "installed in $(COCKPIT_DIR); open Cockpit → virtwarden"

## image: examples/k8s/Dockerfile's image without any registry: Debian packages (mmdebstrap, from
## this machine's apt sources), the release binary, buildah → target/image/virtwarden-<version>.oci.tar.
## The base root file system is cached in target/image and built only when missing.
.PHONY: image
image: deps
	$(CARGO) build --release --locked -p virtwarden --bin virtwarden
	examples/k8s/build-image.sh target/release/virtwarden

## deb: the Debian package (cargo-deb, installed when missing; metadata in controller/Cargo.toml):
## the release binary, the unit (enabled and started on install), the hooks drop-in and examples
## under /usr/share/doc/virtwarden/examples/, the Cockpit page, man pages and completions
## generated from the CLI (`virtwarden generate-assets`), dependencies from the shared libraries.
CARGO_DEB_VERSION := 3.8.0
deb: deps
	@command -v cargo-deb >/dev/null || $(CARGO) install --locked cargo-deb --version $(CARGO_DEB_VERSION)
	$(CARGO) build --release -p virtwarden --bin virtwarden
	rm -rf target/assets
	target/release/virtwarden generate-assets target/assets
	gzip -9n target/assets/man/*.1
	$(CARGO) deb -p virtwarden --no-build

## test-systemd: the package under a real systemd: a cached Debian 12 root (debootstrap, built
## once under target/systemd-host) booted with systemd-nspawn as PID 1, libvirtd and a QEMU
## domain inside; installs the .deb with apt and checks the service as operators meet it.
test-systemd: deb
	tests/systemd/run.sh

## prometheusrule: examples/k8s/prometheusrule.yaml from the Prometheus rules (same groups).
PROMETHEUS_RULES := examples/prometheus/virtwarden-rules.yaml
prometheusrule:
	@{ printf '%s\n' \
	  '# Generated by `make prometheusrule` from $(PROMETHEUS_RULES): edit that file instead.' \
	  '# prometheus-operator: kubectl apply -f examples/k8s/prometheusrule.yaml. It is not in the' \
	  '# kustomization, which must apply on clusters without the PrometheusRule CRD. Add the label' \
	  "# your Prometheus's ruleSelector matches (kube-prometheus-stack: release: <its release>)." \
	  'apiVersion: monitoring.coreos.com/v1' 'kind: PrometheusRule' 'metadata:' '  name: virtwarden' \
	  '  namespace: virtwarden' '  labels:' '    app.kubernetes.io/name: virtwarden' 'spec:'; \
	  sed -n '/^groups:/,$$p' $(PROMETHEUS_RULES) | sed 's/^./  &/'; } > examples/k8s/prometheusrule.yaml.new
	mv examples/k8s/prometheusrule.yaml.new examples/k8s/prometheusrule.yaml

build: deps
	$(CARGO) build --workspace

## run: the controller on an embedded default — libvirt's test driver with the example policies.
## One-shot first (check, plan, apply: the test driver keeps a node file's state inside one
## process, so `apply` observes again itself and prints what is left), then the host service in
## the foreground until Ctrl-C (RUN_SECONDS=N stops it after N seconds).
STATE_DIR := $(CURDIR)/target/virtwarden-state
DATA_DIR := $(CURDIR)/target/virtwarden-data
# The demo runs against the test driver: its own host lock, never the host's /run/virtwarden.lock.
run: export VIRTWARDEN_LOCK_FILE := $(CURDIR)/target/virtwarden.lock
run: build
	$(VIRTWARDEN) check examples/policies
	@echo; echo "== plan against $(TESTBED_URI)"
	@$(VIRTWARDEN) plan --connect $(TESTBED_URI) examples/policies; rc=$$?; \
	  [ $$rc -eq 3 ] && echo "(exit 3: drift found)" || exit $$rc
	@echo; echo "== apply"
	$(VIRTWARDEN) apply --connect $(TESTBED_URI) --data-dir $(DATA_DIR) examples/policies
	@echo; echo "== virtwarden run (Ctrl-C to stop; status: $(VIRTWARDEN) status --state-dir $(STATE_DIR); metrics: curl 127.0.0.1:9477/metrics)"
	@if [ -n "$(RUN_SECONDS)" ]; then \
	  timeout -s TERM $(RUN_SECONDS) $(VIRTWARDEN) run --connect $(TESTBED_URI) --state-dir $(STATE_DIR) --data-dir $(DATA_DIR) examples/policies; rc=$$?; \
	  [ $$rc -eq 124 ] || [ $$rc -eq 0 ] || exit $$rc; \
	  $(VIRTWARDEN) status --state-dir $(STATE_DIR); \
	else \
	  $(VIRTWARDEN) run --connect $(TESTBED_URI) --state-dir $(STATE_DIR) --data-dir $(DATA_DIR) examples/policies; \
	fi

## k8s-testenv: the real Kubernetes API server the operator's tests run against: kube-apiserver and
## kube-controller-manager 1.20 built from Debian's source package into target/k8s/bin (~6 min on
## 2 cores, once; nothing when present), etcd-server and openssl from Debian.
k8s-testenv:
	controller/tests/k8s/testenv.sh

## A test that hangs fails the run after TEST_TIMEOUT (libtest names it: "has been running for over
## 60 seconds") instead of taking the whole CI budget; the suite takes ~5 min warm, ~10 cold.
## --no-fail-fast: one failing test binary does not hide the others' results (CI shows them all).
TEST_TIMEOUT ?= 40m
test: deps deps-ops k8s-testenv
	$(CARGO) fmt --all -- --check
	timeout --kill-after=30s $(TEST_TIMEOUT) $(CARGO) test --workspace --no-fail-fast
	$(MAKE) test-systemd

## test-fast: the suite without the end-to-end tests (private libvirtd + QEMU), for local loops.
test-fast: deps deps-ops k8s-testenv
	$(CARGO) test --workspace -- --skip e2e_

## bench: event→action latency, resync of 1,000 domains, idle CPU/RSS of `run` (BENCH_IDLE_SECS, default 60).
bench: deps
	$(CARGO) bench -p virtwarden --bench plan --bench events --bench idle

## bench-e2e: recovery after SIGKILL of QEMU vs the floor and a 10 s polling watchdog (BENCH_CRASHES, default 20).
bench-e2e: deps
	$(CARGO) bench -p virtwarden --bench e2e

## bench-operator: Kubernetes API requests per change with 1, 10 and 100 simulated nodes (in-memory API
## server), then on the real kube-apiserver (k8s-testenv) with 3 operator processes: HostPolicy edit →
## enactment updated p50/p99 and API requests per edit from the audit log (BENCH_EDITS, default 40).
bench-operator: deps k8s-testenv
	$(CARGO) test -p virtwarden --test operator_scale -- --nocapture
	$(CARGO) bench -p virtwarden --bench operator_api

## bench-apply: apply of 16/50 stopped domains vs parallel `virsh start`, a --parallel sweep, one
## connection vs a pool, Ansible's community.libvirt.virt on 20 domains, a mass crash under `run`
## per --max-concurrent-starts (private libvirtd + QEMU; BENCH_REPEAT runs per figure, default 5;
## BENCH_SKIP_ANSIBLE=1; BENCH_ONLY=crash,apply,…; BENCH_STARTS=8,16).
bench-apply: deps
	@for p in python3-libvirt python3-venv; do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	$(CARGO) bench -p virtwarden --bench apply

## bench-net: drift → repaired latency for port detach, STP flip, forwarding reset; uplink takeover →
## gateway reachable and failed verification → connectivity back (private netns, gateway in a peer netns).
bench-net: deps
	$(CARGO) bench -p virtwarden --bench net

## fuzz: AFL++ through cargo-afl (stable toolchain) on the policy loader, the domain-XML reader and the
## boot-order rewrite, one target after the other, FUZZ_SECONDS each (default 600). Installs cargo-afl
## (which builds AFL++ for this rustc) when missing. Findings: fuzz/out/<target>/default/{crashes,hangs}.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= policy_loader domain_xml boot_xml
fuzz: deps
	@command -v cargo-afl >/dev/null || $(CARGO) install --locked cargo-afl --version 0.18.2
	@out=$$($(CARGO) afl config --build 2>&1) || echo "$$out" | grep -q "already built" || { echo "$$out"; exit 1; }
	cd fuzz && $(CARGO) afl build --release --locked
	fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)
## bench-health: CPU of probing 1,000 guests every 10 s (local listeners stand in; target ≤ 1 % of a core), probe p50/p99;
## then on the private libvirtd under `run`: service killed / kernel panic → detected → serving again (BENCH_HEALTH_TRIALS, default 10).
bench-health: deps
	$(CARGO) bench -p virtwarden --bench health
	$(CARGO) bench -p virtwarden --bench health_e2e

fmt:
	$(CARGO) fmt --all

lint: deps lint-core
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## lint-core: the engine, planner and model (crate virtwarden-core, core/) stay backend-neutral:
## none of these crates among its normal or build dependencies, direct or not (ARCHITECTURE.md).
CORE_FORBIDDEN := virt rtnetlink netlink-packet-route kube k8s-openapi hyper hyper-util
lint-core:
	@tree=$$($(CARGO) tree -p virtwarden-core -e normal,build --prefix none) || exit 1; \
	found=$$(printf '%s\n' "$$tree" | awk '{print $$1}' | sort -u | grep -Fx $(patsubst %,-e %,$(CORE_FORBIDDEN))); \
	if [ -n "$$found" ]; then \
	  for c in $$found; do \
	    echo "lint-core: virtwarden-core (core/) depends on '$$c', through:"; \
	    $(CARGO) tree -p virtwarden-core -e normal,build -i $$c | sed 's/^/    /'; \
	  done; \
	  echo "lint-core: the rule: core/ never depends on a backend crate ($(CORE_FORBIDDEN));"; \
	  echo "           put the code that needs it in controller/ behind a trait of core (ARCHITECTURE.md)."; \
	  exit 1; \
	fi; \
	echo "lint-core: virtwarden-core depends on none of: $(CORE_FORBIDDEN)"

crd:
	$(CARGO) run -q -p virtwarden-crd --bin crdgen > examples/k8s/crd.yaml.new
	mv examples/k8s/crd.yaml.new examples/k8s/crd.yaml

schema: build
	$(VIRTWARDEN) schema > examples/schema/hostpolicy.schema.json.new
	mv examples/schema/hostpolicy.schema.json.new examples/schema/hostpolicy.schema.json

## docs: the field reference in docs/policy-reference.md from the policy schema (tests/tests/docs.rs
## checks it, and that every CLI flag is in a synopsis in docs/).
docs: deps
	UPDATE_DOCS=1 $(CARGO) test -p virtwarden-tests --test docs

clean:
	$(CARGO) clean
