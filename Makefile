# FCSP build, install and test.  `make` builds libvgpu.so (and the simulated
# driver used by the GPU-less tests); `make install` puts everything in place.

PREFIX      ?= /usr/local
DESTDIR     ?=
SYSCONFDIR  ?= /etc
LIBDIR      ?= $(PREFIX)/lib/fcsp
HOOKSDIR    ?= /usr/share/containers/oci/hooks.d
UNITDIR     ?= /etc/systemd/system
PYTHON      ?= $(shell command -v python3)
# The interpreter the hook runs under, resolved past wrappers such as pyenv's
# shims, which would cost a shell and 80 ms on every container start.
HOOK_PYTHON ?= $(shell $(PYTHON) -c 'import sys; print(sys.executable)')
CUDA_INCLUDE ?= /usr/local/cuda/include

CC      ?= gcc
CFLAGS  ?= -O2 -g
SHIM_CFLAGS = -std=c11 -fPIC -fvisibility=hidden -Wall -Wextra -Werror -Wno-unused-parameter \
              -D_GNU_SOURCE -I$(CUDA_INCLUDE) -Ishim $(CFLAGS)
SHIM_LDFLAGS = -shared -Wl,--version-script=shim/libvgpu.map -Wl,-z,now -Wl,-z,relro -ldl -lpthread

SHIM_SRC = $(wildcard shim/*.c)
SHIM_HDR = $(wildcard shim/*.h) shim/libvgpu.map

.PHONY: all shim install uninstall test lint clean demo
all: shim

shim: shim/libvgpu.so

shim/libvgpu.so: $(SHIM_SRC) $(SHIM_HDR)
	$(CC) $(SHIM_CFLAGS) -o $@ $(SHIM_SRC) $(SHIM_LDFLAGS)

install: shim/libvgpu.so
	$(PYTHON) -m pip install --no-deps --no-build-isolation --root-user-action=ignore $(if $(DESTDIR),--root $(DESTDIR)) .
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
	-$(PYTHON) -m pip uninstall -y --root-user-action=ignore fcsp
	rm -f $(DESTDIR)$(LIBDIR)/libvgpu.so $(DESTDIR)$(HOOKSDIR)/fcsp.json
	-rmdir $(DESTDIR)$(LIBDIR)
	for unit in $(wildcard systemd/*.service); do rm -f $(DESTDIR)$(UNITDIR)/$$(basename $$unit); done
	@echo "kept $(SYSCONFDIR)/fcsp/config.toml (your settings); remove it by hand if unwanted"

test: all
	$(PYTHON) -m pytest tests

lint:
	$(PYTHON) -m ruff check fcsp_hook tests bench
	$(PYTHON) -m mypy

demo: install
	bash bench/demo.sh

clean:
	rm -f shim/libvgpu.so
	rm -rf tests/build
