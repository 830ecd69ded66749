# FCSP build, install and test.  `make` builds libvgpu.so (and the simulated
# driver used by the GPU-less tests); `make install` puts everything in place.

PREFIX      ?= /usr/local
DESTDIR     ?=
SYSCONFDIR  ?= /etc
LIBDIR      ?= $(PREFIX)/lib/fcsp
HOOKSDIR    ?= /usr/share/containers/oci/hooks.d
UNITDIR     ?= /etc/systemd/system
# FCSP's Python lives in its own virtual environment, so that it never fights the
# distribution's packages (PEP 668) and the hook's interpreter is a fixed path.
VENV        ?= /opt/fcsp/venv
BASE_PYTHON ?= python3
# Tests run with the venv's interpreter once `make deps` made it, else with python3.
PYTHON      ?= $(shell test -x $(VENV)/bin/python3 && echo $(VENV)/bin/python3 || command -v python3)
# The interpreter the hook runs under: a real binary, never a wrapper such as pyenv's
# shims, which would cost a shell and 80 ms on every container start.
HOOK_PYTHON ?= $(VENV)/bin/python3
APT_PACKAGES = build-essential python3 python3-venv python3-pip podman runc crun \
               busybox-static uidmap
CUDA_INCLUDE ?= /usr/local/cuda/include

CC      ?= gcc
CFLAGS  ?= -O2 -g
SHIM_CFLAGS = -std=c11 -fPIC -fvisibility=hidden -Wall -Wextra -Werror -Wno-unused-parameter \
              -D_GNU_SOURCE -I$(CUDA_INCLUDE) -Ishim $(CFLAGS)
SHIM_LDFLAGS = -shared -Wl,--version-script=shim/libvgpu.map -Wl,-z,now -Wl,-z,relro -ldl -lpthread

SHIM_SRC = $(wildcard shim/*.c)
SHIM_HDR = $(wildcard shim/*.h) shim/libvgpu.map

.PHONY: all shim deps venv install uninstall test lint clean demo
all: shim

shim: shim/libvgpu.so

shim/libvgpu.so: $(SHIM_SRC) $(SHIM_HDR)
	$(CC) $(SHIM_CFLAGS) -o $@ $(SHIM_SRC) $(SHIM_LDFLAGS)

# Everything a fresh Debian/Ubuntu host needs to build, run and test FCSP (as root).
deps: venv
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES)
	$(VENV)/bin/python3 -m pip install -q -e '.[test]'

venv:
	[ -x $(VENV)/bin/python3 ] || { command -v $(BASE_PYTHON) >/dev/null && $(BASE_PYTHON) -m venv $(VENV) 2>/dev/null; } || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && \
		  $(BASE_PYTHON) -m venv $(VENV); }

install: shim/libvgpu.so venv
	$(VENV)/bin/python3 -m pip install -q .
	install -d -m 0755 $(DESTDIR)$(PREFIX)/bin
	ln -sf $(VENV)/bin/fcsp-hook $(DESTDIR)$(PREFIX)/bin/fcsp-hook
	ln -sf $(VENV)/bin/fcspctl $(DESTDIR)$(PREFIX)/bin/fcspctl
	install -D -m 0755 shim/libvgpu.so $(DESTDIR)$(LIBDIR)/libvgpu.so
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/fcsp
	[ -e $(DESTDIR)$(SYSCONFDIR)/fcsp/config.toml ] || \
		install -m 0644 etc/config.toml $(DESTDIR)$(SYSCONFDIR)/fcsp/config.toml
	install -d -m 0755 $(DESTDIR)$(HOOKSDIR)
	$(HOOK_PYTHON) -I -m fcsp_hook.hooksd --python $(HOOK_PYTHON) \
		--config $(SYSCONFDIR)/fcsp/config.toml > $(DESTDIR)$(HOOKSDIR)/fcsp.json
	for unit in $(wildcard systemd/*.service); do \
		install -D -m 0644 $$unit $(DESTDIR)$(UNITDIR)/$$(basename $$unit); done

uninstall:
	-$(VENV)/bin/python3 -m pip uninstall -q -y fcsp
	rm -f $(DESTDIR)$(LIBDIR)/libvgpu.so $(DESTDIR)$(HOOKSDIR)/fcsp.json
	rm -f $(DESTDIR)$(PREFIX)/bin/fcsp-hook $(DESTDIR)$(PREFIX)/bin/fcspctl
	-rmdir $(DESTDIR)$(LIBDIR)
	for unit in $(wildcard systemd/*.service); do rm -f $(DESTDIR)$(UNITDIR)/$$(basename $$unit); done
	@echo "kept $(SYSCONFDIR)/fcsp/config.toml (your settings); remove it by hand if unwanted"

test: all
	$(PYTHON) -m pytest tests

lint:
	$(PYTHON) -m ruff check fcsp_hook tests bench
	$(PYTHON) -m mypy

demo: install
	bash demo/demo.sh

clean:
	rm -f shim/libvgpu.so
	rm -rf tests/build
