"""The tenants of bench/gpu_spill.py, one process each, torch on a GPU (under libvgpu.so
with a slot of the bench's making, or plain).

    python3 bench/spill_workers.py serve TOTAL_MIB SESSION_MIB HOT SECONDS
        sessions' KV-cache buffers totalling TOTAL_MIB; HOT of them updated each step, the
        hot set moving on by one session every MOVE_EVERY steps; GB/s read and written
        (a "ready" line once every session is written)
    python3 bench/spill_workers.py infer WEIGHTS_MIB SECONDS
        an fp16 MLP whose weights take WEIGHTS_MIB, batch of BATCH tokens; tokens/s
    python3 bench/spill_workers.py train MODEL_MIB
        one training step (forward, backward, Adam) of an fp32 MLP whose parameters,
        gradients and Adam state take MODEL_MIB
    python3 bench/spill_workers.py h2d MIB
        host (pinned) to device copies of MIB: GB/s, the bus that spilled memory is read over

Each prints one JSON line with its result; a failure, one line on stderr and exit 1.
"""

# torch is imported in the worker functions: the module imports without a GPU.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import sys
import time
from typing import Any

MiB = 1 << 20
MOVE_EVERY = 200  # steps between two moves of the hot set (about 0.15 s at full speed)
HIDDEN = 8192  # the MLP's width: 128 MiB an fp16 layer, 256 MiB an fp32 one
BATCH = 64


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def serve(total_mib: int, session_mib: int, hot: int, seconds: float) -> None:
    import torch

    sessions = [
        torch.zeros(session_mib * MiB // 2, dtype=torch.float16, device="cuda")
        for _ in range(max(1, total_mib // session_mib))
    ]
    for s in sessions:  # every session written once, as a prompt's prefill does
        s.add_(1)
    torch.cuda.synchronize()
    say(ready=True)
    steps, start = 0, 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        for k in range(hot):
            sessions[(start + k) % len(sessions)].mul_(1.0001)
        torch.cuda.synchronize()
        steps += 1
        if steps % MOVE_EVERY == 0:
            start += 1
    elapsed = time.perf_counter() - began
    moved = 2 * steps * hot * session_mib * MiB  # each updated byte read and written
    say(gbps=moved / elapsed / 1e9, steps=steps, sessions=len(sessions), seconds=elapsed)


def _layers(total_mib: int, dtype: Any, bytes_per: int) -> list[Any]:
    import torch

    per_layer = HIDDEN * HIDDEN * bytes_per // MiB
    return [
        torch.randn(HIDDEN, HIDDEN, dtype=dtype, device="cuda") / HIDDEN**0.5
        for _ in range(max(1, total_mib // per_layer))
    ]


def infer(weights_mib: int, seconds: float) -> None:
    import torch

    weights = _layers(weights_mib, torch.float16, 2)
    x0 = torch.randn(BATCH, HIDDEN, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        tokens = 0
        began = time.perf_counter()
        while time.perf_counter() - began < seconds:
            x = x0
            for w in weights:
                x = torch.relu(x @ w)
            torch.cuda.synchronize()
            tokens += BATCH
    elapsed = time.perf_counter() - began
    say(tokens_per_s=tokens / elapsed, layers=len(weights), seconds=elapsed)


def train(model_mib: int) -> None:
    import torch

    # fp32 parameters, their gradients and Adam's two moments: four times the parameters.
    params = [w.requires_grad_() for w in _layers(model_mib // 4, torch.float32, 4)]
    optimizer = torch.optim.Adam(params, lr=1e-4)
    x = torch.randn(BATCH, HIDDEN, device="cuda")
    began = time.perf_counter()
    for w in params:
        x = torch.relu(x @ w)
    loss = x.square().mean()
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize()
    say(loss=float(loss), layers=len(params), seconds=time.perf_counter() - began)


def h2d(mib: int) -> None:
    import torch

    host = torch.empty(mib * MiB, dtype=torch.uint8, pin_memory=True)
    device = torch.empty_like(host, device="cuda")
    device.copy_(host)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    say(gbps=mib * MiB / times[len(times) // 2] / 1e9)


def main(argv: list[str]) -> int:
    commands = {
        "serve": lambda a: serve(int(a[0]), int(a[1]), int(a[2]), float(a[3])),
        "infer": lambda a: infer(int(a[0]), float(a[1])),
        "train": lambda a: train(int(a[0])),
        "h2d": lambda a: h2d(int(a[0])),
    }
    try:
        commands[argv[0]](argv[1:])
    except Exception as exc:  # one line for the orchestrator, which reports it
        print(f"{type(exc).__name__}: {exc}"[:300], file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
