"""What the benchmarks share.  They run from a checkout, never from an install.

scene      tenants as a bench runs them: slots, worker processes under libvgpu.so, one
           fcsp-observer started from this checkout, MPS daemons, and the teardown
gpu        the GPUs: an inventory (NVML, else nvidia-smi) and one sampler of SM clock,
           power and utilisation (per GPU, and per process where asked)
report     results documents: the standard header, tables, PNG plots; $OUT/<name>.md
torchwork  the PyTorch workloads that worker processes run (matmuls timed on the GPU)

Importing the package puts the checkout first on sys.path, so that `fcsp_hook` is this
checkout's whatever is installed; scripts in bench/ import it before anything of FCSP's.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
SHIM = REPO / "shim" / "libvgpu.so"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
