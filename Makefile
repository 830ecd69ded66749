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
# The distribution's interpreter where there is one: systemd's ProtectHome= cannot run one
# under a home directory, and a -I -S start of Debian's takes half as long as a home-built
# one (the fallback hook starts it twice per container).
BASE_PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
# Tests run with the venv's interpreter once `make deps` made it, else with python3.
PYTHON      ?= $(shell test -x $(VENV)/bin/python3 && echo $(VENV)/bin/python3 || command -v python3)
# The interpreter the hook runs under: a real binary, never a wrapper such as pyenv's
# shims, which would cost a shell and 80 ms on every container start.
HOOK_PYTHON ?= $(VENV)/bin/python3
APT_PACKAGES = build-essential python3 python3-venv python3-pip podman runc crun mmdebstrap \
               busybox-static uidmap iproute2 containerd
CUDA_INCLUDE ?= /usr/local/cuda/include

CC      ?= gcc
CFLAGS  ?= -O2 -g
GEN_DIR  = shim/build
SHIM_CFLAGS = -std=c11 -fPIC -fvisibility=hidden -Wall -Wextra -Werror -Wno-unused-parameter \
              -D_GNU_SOURCE -I$(CUDA_INCLUDE) -Ishim -I$(GEN_DIR) $(CFLAGS)
# Only libc: libdl and libpthread are not dependencies, since an image may lack them and
# ld.so refuses a preloaded object whose dependency is missing; the functions an older
# glibc keeps there are weak references (shim/glibc_compat.h).
SHIM_LDFLAGS = -shared -Wl,--version-script=$(GEN_DIR)/libvgpu.map -Wl,-z,now -Wl,-z,relro

# shim/hooks.def is the one list of hooked entry points: the enum, the dispatch
# table and the export list are generated from it.
SHIM_GEN = $(GEN_DIR)/hooks_gen.h $(GEN_DIR)/hooks_gen.c $(GEN_DIR)/libvgpu.map
SHIM_SRC = $(wildcard shim/*.c)
SHIM_HDR = $(wildcard shim/*.h)

# The GPU-less tier: a simulated driver and NVML, and driver-API test programs.
SIM_DIR  = tests/build/sim
TPROG_DIR = tests/build/shim
SIM_CFLAGS = -std=c11 -fPIC -Wall -Wextra -Werror -Wno-unused-parameter -D_GNU_SOURCE \
             -D__CUDA_API_VERSION_INTERNAL -I$(CUDA_INCLUDE) -Ishim -Itests/sim $(CFLAGS)
SIM_LIBS = $(SIM_DIR)/libcuda.so.1 $(SIM_DIR)/libnvidia-ml.so.1
TPROGS   = $(TPROG_DIR)/drv_procaddr $(TPROG_DIR)/drv_direct $(TPROG_DIR)/nvmlq \
           $(TPROG_DIR)/rtld_next

.PHONY: all shim sim deps venv install uninstall test lint clean demo
all: shim sim hookc/fcsp-hook hookc/fcsp-runtime

# The native programs on the container-start path, linked statically: the node image
# copies them onto hosts whatever their libc.  fcsp-hook is the hooks.d entry's program (a
# container start pays a C start, not Python's: it asks fcsp-hookd, and runs the Python
# hook only when that cannot answer); fcsp-runtime is the wrapper's pass-through, run
# several times per container start.
HOOKC_CFLAGS = -std=c11 -Wall -Wextra -Werror -static $(CFLAGS)
hookc/fcsp-hook: hookc/fcsp-hook.c hookc/hookd.c hookc/hookd.h
	$(CC) $(HOOKC_CFLAGS) -o $@ hookc/fcsp-hook.c hookc/hookd.c

hookc/fcsp-runtime: hookc/fcsp-runtime.c hookc/hookd.c hookc/hookd.h
	$(CC) $(HOOKC_CFLAGS) -DPYTHON_RUNTIME='"$(LIBDIR)/fcsp-runtime.py"' -o $@ \
		hookc/fcsp-runtime.c hookc/hookd.c

shim: shim/libvgpu.so

$(SHIM_GEN) &: shim/hooks.def shim/gen_hooks.py
	$(PYTHON) shim/gen_hooks.py shim/hooks.def $(GEN_DIR)

shim/libvgpu.so: $(SHIM_SRC) $(SHIM_HDR) $(SHIM_GEN) Makefile
	$(CC) $(SHIM_CFLAGS) -o $@ $(SHIM_SRC) $(GEN_DIR)/hooks_gen.c $(SHIM_LDFLAGS)

sim: $(SIM_LIBS) $(TPROGS) $(SIM_DIR)/bin/nvidia-cuda-mps-control

$(SIM_DIR)/bin/nvidia-cuda-mps-control: tests/sim/mps_control.c
	@mkdir -p $(SIM_DIR)/bin
	$(CC) $(SIM_CFLAGS) -Wno-format-truncation -o $@ $<

# -Bsymbolic: the simulator's cuGetProcAddress must hand out its own functions,
# not the preloaded shim's exports of the same names (as the real driver does).
$(SIM_DIR)/libcuda.so.1: tests/sim/cuda_sim.c tests/sim/sim_state.c tests/sim/sim_state.h
	@mkdir -p $(SIM_DIR)
	$(CC) $(SIM_CFLAGS) -shared -Wl,-soname,libcuda.so.1 -Wl,-Bsymbolic -o $@ \
		tests/sim/cuda_sim.c tests/sim/sim_state.c -lpthread
	ln -sf libcuda.so.1 $(SIM_DIR)/libcuda.so

$(SIM_DIR)/libnvidia-ml.so.1: tests/sim/nvml_sim.c tests/sim/sim_state.c tests/sim/sim_state.h
	@mkdir -p $(SIM_DIR)
	$(CC) $(SIM_CFLAGS) -shared -Wl,-soname,libnvidia-ml.so.1 -Wl,-Bsymbolic -o $@ \
		tests/sim/nvml_sim.c tests/sim/sim_state.c -lpthread

# The test programs read the slot's layout: a change to it rebuilds them.
$(TPROG_DIR)/drv_procaddr: tests/shim/drv.c tests/shim/drv_procaddr.c tests/shim/drv.h shim/fcsp_slot.h
	@mkdir -p $(TPROG_DIR)
	$(CC) $(SIM_CFLAGS) -o $@ tests/shim/drv.c tests/shim/drv_procaddr.c -ldl -lpthread

# Linked against the simulated libcuda.so.1 like a program built with -lcuda.
$(TPROG_DIR)/drv_direct: tests/shim/drv.c tests/shim/drv_direct.c tests/shim/drv.h shim/fcsp_slot.h \
		$(SIM_DIR)/libcuda.so.1
	@mkdir -p $(TPROG_DIR)
	$(CC) $(SIM_CFLAGS) -o $@ tests/shim/drv.c tests/shim/drv_direct.c -L$(SIM_DIR) -lcuda -ldl -lpthread

$(TPROG_DIR)/nvmlq: tests/shim/nvmlq.c
	@mkdir -p $(TPROG_DIR)
	$(CC) $(SIM_CFLAGS) -o $@ $< -ldl

$(TPROG_DIR)/librtld_a.so: tests/shim/rtld_a.c
	@mkdir -p $(TPROG_DIR)
	$(CC) $(SIM_CFLAGS) -shared -o $@ $< -ldl

$(TPROG_DIR)/librtld_b.so: tests/shim/rtld_b.c
	@mkdir -p $(TPROG_DIR)
	$(CC) $(SIM_CFLAGS) -shared -o $@ $<

$(TPROG_DIR)/rtld_next: tests/shim/rtld_main.c $(TPROG_DIR)/librtld_a.so $(TPROG_DIR)/librtld_b.so $(SIM_DIR)/libcuda.so.1
	$(CC) $(SIM_CFLAGS) -o $@ $< -L$(TPROG_DIR) -Wl,--no-as-needed -lrtld_a -lrtld_b -L$(SIM_DIR) -lcuda -ldl \
		-Wl,-rpath,'$$ORIGIN'

# Everything a fresh Debian/Ubuntu host needs to build, run and test FCSP (as root).
deps: venv
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES)
	$(VENV)/bin/python3 -m pip install -q -e '.[test]'

venv:
	[ -x $(VENV)/bin/python3 ] || { command -v $(BASE_PYTHON) >/dev/null && $(BASE_PYTHON) -m venv $(VENV) 2>/dev/null; } || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && \
		  $(BASE_PYTHON) -m venv $(VENV); }
	@case "$$(readlink -f $(VENV)/bin/python3)" in /root/*|/home/*) \
		echo "warning: $(VENV) runs $$(readlink -f $(VENV)/bin/python3), under a home directory:" \
		     "fcsp-observer.service (ProtectHome=yes) cannot start it; rebuild it with" \
		     "BASE_PYTHON=/usr/bin/python3" >&2;; esac

# With DESTDIR (staging a package) only files are staged; the Python package goes into
# $(VENV) on the target, by `make install` there without DESTDIR.
install: shim/libvgpu.so hookc/fcsp-hook hookc/fcsp-runtime venv
	[ -n "$(DESTDIR)" ] || $(VENV)/bin/python3 -m pip install -q .
	install -d -m 0755 $(DESTDIR)$(PREFIX)/bin
	ln -sf $(VENV)/bin/fcsp-hook $(DESTDIR)$(PREFIX)/bin/fcsp-hook
	ln -sf $(VENV)/bin/fcspctl $(DESTDIR)$(PREFIX)/bin/fcspctl
# fcsp-runtime runs 3-4 times per container start: the native launcher passes through
# itself and runs the Python runtime (a minimal launcher rather than pip's console script,
# which imports re first) for FCSP's creates only, whose hook entry runs the native client
# (fcsp-hookd's, as the hooks.d entry does).  -I: the engine's PYTHON* variables never
# reach it.  -S as well where the package's directory is known (not when staging with
# DESTDIR): `site` and the venv's .pth files cost ~18 ms a start.
	rm -f $(DESTDIR)$(PREFIX)/bin/fcsp-runtime $(DESTDIR)$(LIBDIR)/fcsp-runtime.py
	install -d -m 0755 $(DESTDIR)$(LIBDIR)
	pkg=$$([ -n "$(DESTDIR)" ] || $(HOOK_PYTHON) -I -c 'import os, fcsp_hook; \
		print(os.path.dirname(os.path.dirname(os.path.abspath(fcsp_hook.__file__))))'); \
	if [ -n "$$pkg" ]; then \
		printf '#!%s -IS\nimport sys\nsys.path.insert(0, "%s")\n' '$(HOOK_PYTHON)' "$$pkg"; \
	else printf '#!%s -I\nimport sys\n' '$(HOOK_PYTHON)'; fi \
		> $(DESTDIR)$(LIBDIR)/fcsp-runtime.py
	printf 'from fcsp_hook.hook.runtime import main\nsys.exit(main(hook_client="%s"))\n' \
		'$(LIBDIR)/fcsp-hook' >> $(DESTDIR)$(LIBDIR)/fcsp-runtime.py
	chmod 0755 $(DESTDIR)$(LIBDIR)/fcsp-runtime.py
	install -m 0755 hookc/fcsp-runtime $(DESTDIR)$(PREFIX)/bin/fcsp-runtime
	install -D -m 0755 shim/libvgpu.so $(DESTDIR)$(LIBDIR)/libvgpu.so
	install -D -m 0755 hookc/fcsp-hook $(DESTDIR)$(LIBDIR)/fcsp-hook
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/fcsp
	[ -e $(DESTDIR)$(SYSCONFDIR)/fcsp/config.toml ] || \
		install -m 0644 etc/config.toml $(DESTDIR)$(SYSCONFDIR)/fcsp/config.toml
	install -d -m 0755 $(DESTDIR)$(HOOKSDIR)
	$(BASE_PYTHON) -m fcsp_hook.hook.hooksd --python $(HOOK_PYTHON) --client $(LIBDIR)/fcsp-hook \
		--config $(SYSCONFDIR)/fcsp/config.toml > $(DESTDIR)$(HOOKSDIR)/fcsp.json
	for unit in $(wildcard systemd/*.service systemd/*.socket); do \
		install -D -m 0644 $$unit $(DESTDIR)$(UNITDIR)/$$(basename $$unit); done

uninstall:
	[ -n "$(DESTDIR)" ] || $(VENV)/bin/python3 -m pip uninstall -q -y fcsp || true
	rm -f $(DESTDIR)$(LIBDIR)/libvgpu.so $(DESTDIR)$(LIBDIR)/fcsp-hook $(DESTDIR)$(HOOKSDIR)/fcsp.json
	rm -f $(DESTDIR)$(PREFIX)/bin/fcsp-hook $(DESTDIR)$(PREFIX)/bin/fcspctl
	rm -f $(DESTDIR)$(PREFIX)/bin/fcsp-runtime $(DESTDIR)$(LIBDIR)/fcsp-runtime.py
	-rmdir $(DESTDIR)$(LIBDIR)
	for unit in $(wildcard systemd/*.service systemd/*.socket); do \
		rm -f $(DESTDIR)$(UNITDIR)/$$(basename $$unit); done
	@echo "kept $(SYSCONFDIR)/fcsp/config.toml (your settings); remove it by hand if unwanted"

test: all
	$(PYTHON) -m pytest tests

lint:
	$(PYTHON) -m ruff check fcsp_hook tests bench
	$(PYTHON) -m mypy

demo: install sim
	bash demo/demo.sh

clean:
	rm -f shim/libvgpu.so hookc/fcsp-hook hookc/fcsp-runtime
	rm -rf tests/build $(GEN_DIR)

# The fcsp-node image etc/kubernetes/daemonset.yaml runs (image/Containerfile): build it with
# `make image IMAGE=registry/you/fcsp-node:tag`, then `$(ENGINE) push` it.  IMAGE_BASE is the
# Debian both stages start from; IMAGE_FLAGS, more `$(ENGINE) build` flags.
IMAGE       ?= ghcr.io/fcsp/fcsp-node:0.1.0
ENGINE      ?= podman
IMAGE_BASE  ?= docker.io/library/debian:bookworm-slim
IMAGE_FLAGS ?=

.PHONY: image
image:
	$(ENGINE) build $(IMAGE_FLAGS) --build-arg BASE=$(IMAGE_BASE) -f image/Containerfile \
		-t $(IMAGE) .
