# ism-backend: build, lint, unit tests, and the VM tests with real QEMU guests.
#
#   make test        lint + unit tests (-race) + vmtest (provisions what it needs)
#   make vmtest      QEMU guests against the real backend (TCG; minutes)
#   make bench-device  host-side MOVE figures vs memmove (no VM; ~1.5 min)
#   make bench       bench-device, then SMC-D vs TCP/UNIX in QEMU guests (table; bench-results/)
#   make bench-quick the VM part only, 2 short rounds
#   make soak        guests killed and restarted under SMC-D load (30 min; not in make test)
#
# Downloads go to $(ISM_CACHE) (default .cache/ in the repo); every step is
# idempotent. The guest kernel for the kernel's own SMC-D is built once per
# machine into $(ISM_KERNEL_CACHE) (default ~/.cache/ism-backend, outside the
# clone; 10-20 min the first time): scripts/provision-smc-kernel.sh. QEMU=/path/qemu-system-x86_64 and KERNEL=/path/vmlinuz override
# the provisioned ones (the image still takes its modules from the provisioned
# Debian kernel, so an overriding KERNEL must be the same 6.1.0 build or need
# no modules).

SHELL := /bin/bash
.DEFAULT_GOAL := build

GO ?= go
ISM_CACHE ?= $(CURDIR)/.cache
export ISM_CACHE
QEMU ?= $(ISM_CACHE)/qemu/qemu-system-x86_64
KERNEL ?= $(ISM_CACHE)/kernel/vmlinuz
INITRD ?= $(ISM_CACHE)/image/initramfs.cpio
# Linux 7.x with DIBS and SMC (guestdriver/kernel/ism-guest.config), and our
# DIBS driver built against it (guestdriver/kernel), carried in the image.
SMC_KERNEL ?= $(ISM_CACHE)/smc-kernel/bzImage
KMOD_STAMP := $(ISM_CACHE)/smc-kernel/modules/.stamp
KMOD_SOURCES := $(wildcard guestdriver/kernel/*.c guestdriver/kernel/*.h guestdriver/kernel/Kbuild)
BACKEND ?= $(CURDIR)/bin/ism-backend
# Extra flags for the VM tests, e.g. VMTEST_FLAGS='-run TestHello -v'. Only the
# test/vm package itself: with one package go test streams -v output as it
# goes (the harness's own unit tests run in `unit`).
VMTEST_FLAGS ?= -v
VMTEST_TIMEOUT ?= 60m

GO_SOURCES := $(shell find . -path ./.cache -prune -o -path ./.git -prune -o -name '*.go' -print)

.PHONY: build backend lint unit test vmtest provision provision-qemu provision-kernel provision-smc-kernel kmod image bench bench-quick bench-device soak clean distclean

build:
	$(GO) build ./...
	@mkdir -p bin
	$(GO) build -o bin/ ./cmd/...
	@echo "build: binaries in bin/: $$(ls bin | tr '\n' ' ')"

lint:
	@out=$$(gofmt -l $(GO_SOURCES)); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

# Unit tests need no VM pieces; test/vm skips itself without ISM_VMTEST=1.
unit:
	$(GO) test -race ./...

# Provisioning comes before the unit tests so that vhostuser's TestRealQEMU
# (qtest against the real QEMU) runs instead of skipping.
test: lint provision unit vmtest

provision: provision-qemu provision-kernel provision-smc-kernel

# Skipped when QEMU= points elsewhere: then that binary is the caller's choice.
provision-qemu:
	@if [ "$(QEMU)" = "$(ISM_CACHE)/qemu/qemu-system-x86_64" ]; then \
		scripts/provision-qemu.sh; \
	else echo "qemu: using QEMU=$(QEMU)"; "$(QEMU)" --version | head -n1; fi

provision-kernel:
	@scripts/provision-kernel.sh

provision-smc-kernel:
	@scripts/provision-smc-kernel.sh

kmod: $(KMOD_STAMP)

$(KMOD_STAMP): $(KMOD_SOURCES) scripts/build-kmod.sh $(ISM_CACHE)/smc-kernel/version
	@scripts/build-kmod.sh && touch $@

$(ISM_CACHE)/smc-kernel/version:
	@scripts/provision-smc-kernel.sh

image: $(INITRD)

# Rebuilt when any Go source, the module files or the kernel modules change.
$(INITRD): $(GO_SOURCES) go.mod go.sum images/build.sh $(ISM_CACHE)/kernel/.stamp $(KMOD_STAMP)
	@images/build.sh $(INITRD)

$(ISM_CACHE)/kernel/.stamp:
	@scripts/provision-kernel.sh

# The backend is optional until cmd/ism-backend exists; tests that need it
# skip when ISM_BACKEND is empty.
backend:
	@if [ -d cmd/ism-backend ]; then mkdir -p bin && $(GO) build -o $(BACKEND) ./cmd/ism-backend; fi

vmtest: provision image backend
	@echo "vmtest: QEMU guests under $$(grep -qE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ] && echo KVM || echo TCG) (several minutes)"
	ISM_VMTEST=1 ISM_QEMU=$(QEMU) ISM_KERNEL=$(KERNEL) ISM_SMC_KERNEL=$(SMC_KERNEL) ISM_INITRD=$(INITRD) \
	ISM_BACKEND=$$([ -x $(BACKEND) ] && echo $(BACKEND)) \
		$(GO) test -count=1 -timeout $(VMTEST_TIMEOUT) $(VMTEST_FLAGS) ./test/vm

# Not part of make test: SOAK_GUESTS guests (even, >= 4) in pairs on one
# backend for SOAK_DURATION, SHA-256-checked SMC-D streams in both modes,
# clients of all pairs but the first killed and restarted at random
# (test/soak). It reports any loss and the backend's memory and descriptors.
SOAK_DURATION ?= 30m
SOAK_GUESTS ?= 4
soak: provision image backend
	@echo "soak: $(SOAK_GUESTS) guests for $(SOAK_DURATION) (plus ~3 min to boot and stop them)"
	ISM_SOAK=1 ISM_SOAK_DURATION=$(SOAK_DURATION) ISM_SOAK_GUESTS=$(SOAK_GUESTS) \
	ISM_VMTEST=1 ISM_QEMU=$(QEMU) ISM_KERNEL=$(KERNEL) ISM_SMC_KERNEL=$(SMC_KERNEL) ISM_INITRD=$(INITRD) \
	ISM_BACKEND=$$([ -x $(BACKEND) ] && echo $(BACKEND)) \
		$(GO) test -count=1 -timeout 0 -v -run '^TestSoak$$' ./test/soak

# Device figures first, then the VM table (test/bench; ~17 min under TCG).
bench: bench-device provision image backend
	ISM_BENCH=1 ISM_VMTEST=1 ISM_QEMU=$(QEMU) ISM_KERNEL=$(KERNEL) ISM_SMC_KERNEL=$(SMC_KERNEL) ISM_INITRD=$(INITRD) \
	ISM_BACKEND=$$([ -x $(BACKEND) ] && echo $(BACKEND)) \
		$(GO) test -count=1 -timeout 30m -v -run '^TestBench$$' ./test/bench

# The VM table only, 2 rounds of 1 s, no idle phase (~5 min under TCG).
bench-quick: provision image backend
	ISM_BENCH=1 ISM_VMTEST=1 ISM_QEMU=$(QEMU) ISM_KERNEL=$(KERNEL) ISM_SMC_KERNEL=$(SMC_KERNEL) ISM_INITRD=$(INITRD) \
	ISM_BACKEND=$$([ -x $(BACKEND) ] && echo $(BACKEND)) \
	ISM_BENCH_ROUNDS=$${ISM_BENCH_ROUNDS:-2} ISM_BENCH_DUR=$${ISM_BENCH_DUR:-1s} ISM_BENCH_SCOPES=$${ISM_BENCH_SCOPES:-inter,intra} \
		$(GO) test -count=1 -timeout 30m -v -run '^TestBench$$' ./test/bench

# MOVE 64 KiB and 64 B through the vhost-user path and in the device model
# alone, each next to memmove in the same run (x_memmove); ROUNDS=5 rounds,
# summary with medians and ranges (~1.5 min). See scripts/bench-device.sh.
bench-device:
	GO=$(GO) ./scripts/bench-device.sh

clean:
	rm -rf bin $(ISM_CACHE)/image

# Also drops the provisioned QEMU and kernel (next vmtest fetches them again).
distclean: clean
	rm -rf $(ISM_CACHE)
