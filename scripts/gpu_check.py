"""The GPU check of issue 13: ``python scripts/gpu_check.py OUT_DIR [--compile]``.

Runs ``diffusolve bench devices`` (the bundled model's sampling and a GMM sampler at batch
256 on CUDA and the CPU, samples per second against the bare network's time for the same
evaluations, bf16, CUDA-vs-CPU agreement) and writes OUT_DIR/devices.json and
OUT_DIR/devices.md. Without CUDA it reports CPU figures and says so. About 1-2 minutes on a
GPU machine (most of it the CPU side).
"""

from __future__ import annotations

import argparse
import sys

from diffusolve.bench.devices import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py")
    add_arguments(parser)
    argv = sys.argv[1:]
    if argv and not argv[0].startswith("-"):
        argv = ["--out", argv[0], *argv[1:]]
    raise SystemExit(main(parser.parse_args(argv)))
