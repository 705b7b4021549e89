"""One GPU workload for run_gpu_check.py, run as a throwaway user; needs torch with CUDA.

    python gpu_worker.py MODE [--seconds S] [--gib N]

Modes: busy (matmul loop), hold (N GiB held, no kernels), duty (1.5 s of
matmuls, 1.5 s asleep), job (busy for --seconds, then exit; with --wait-go
it is set up, then waits for a line on stdin), spin (a one-thread spin
kernel: utilization 100 %, one SM of all in use). Prints
"ready" once CUDA is up and memory is allocated, so the caller starts its
phase clock only then; runs until --seconds pass (0: until SIGTERM).
Not a test module: pytest never collects it (no test_ prefix).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from types import FrameType

try:
    import torch
except ImportError:  # --help still works; run_gpu_check.py checks for torch before it starts a worker
    torch = None

MATRIX = 8192  # two bf16 8k x 8k matrices: ~0.4 GiB, ~1 TFLOP per product
SPIN_CYCLES = 500_000_000  # one torch.cuda._sleep launch: ~0.25 s at H100 clocks


def _stop(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def _ready() -> None:
    torch.cuda.synchronize()
    print("ready", flush=True)


def _matmuls_for(seconds: float, a: torch.Tensor, b: torch.Tensor) -> None:
    """Back-to-back matmuls, synchronizing often so the stretch ends on time."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(4):
            torch.mm(a, b)
        torch.cuda.synchronize()


def _until(deadline: float | None) -> bool:
    return deadline is None or time.monotonic() < deadline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("busy", "hold", "duty", "job", "spin"))
    parser.add_argument("--seconds", type=float, default=0.0, help="run this long after ready (0: until SIGTERM)")
    parser.add_argument("--gib", type=float, default=8.0, help="memory to hold in hold mode (GiB)")
    parser.add_argument("--on", type=float, default=1.5, help="duty mode: busy seconds per cycle")
    parser.add_argument("--off", type=float, default=1.5, help="duty mode: idle seconds per cycle")
    parser.add_argument("--wait-go", action="store_true",
                        help="after ready, start only when a line arrives on stdin (so the next job is set up in advance)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    if torch is None:
        raise SystemExit("no torch in this interpreter")
    if not torch.cuda.is_available():
        raise SystemExit("torch sees no CUDA device")
    device = torch.device("cuda", 0)  # the caller picks the GPU with CUDA_VISIBLE_DEVICES=<uuid>
    a = torch.randn(MATRIX, MATRIX, device=device, dtype=torch.bfloat16)
    b = torch.randn(MATRIX, MATRIX, device=device, dtype=torch.bfloat16)
    held = None
    if args.mode == "hold":
        held = torch.ones(int(args.gib * 2**30), dtype=torch.uint8, device=device)  # touched, so really resident
        del a, b
    _ready()
    if args.wait_go:
        sys.stdin.readline()  # held, idle, until the previous job is done
    deadline = time.monotonic() + args.seconds if args.seconds > 0 else None
    if args.mode in ("busy", "job"):
        while _until(deadline):
            _matmuls_for(1.0 if deadline is None else min(1.0, deadline - time.monotonic()), a, b)
    elif args.mode == "duty":
        while _until(deadline):
            _matmuls_for(args.on, a, b)
            time.sleep(args.off)
    elif args.mode == "spin":
        # ATen's _sleep is a <<<1, 1>>> kernel that spins for N cycles: a kernel
        # always resident (utilization 100 %) on a single SM.
        while _until(deadline):
            torch.cuda._sleep(SPIN_CYCLES)
            torch.cuda.synchronize()
    else:
        while _until(deadline):
            time.sleep(0.5)
    del held


if __name__ == "__main__":
    main()
