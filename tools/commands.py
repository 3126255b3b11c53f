"""The bundle's commands as a user types them, for the developer tools: ``python -m monai.bundle run ...`` in a
fresh process in the bundle's folder."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from tools.bundle import BUNDLE_ROOT


def run_bundle(*args: str, log: str | None = None, env: dict | None = None) -> dict:
    """Run ``python -m monai.bundle <args>``, its output to ``log`` (or a temporary file); stop with the end of
    that output if it fails. Returns its ``start`` (epoch seconds), ``wall_s`` and ``peak_rss_mib``."""
    start, t0 = time.time(), time.perf_counter()
    with open(log, "w+") if log else tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "monai.bundle", *args], cwd=BUNDLE_ROOT, stdout=out, stderr=out, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own resource usage
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status):
            out.seek(0)
            sys.exit(f"ERROR: `monai.bundle {' '.join(args[:2])}` failed; the end of its output:\n{out.read()[-3000:]}")
    return {"start": start, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}  # KiB on Linux


def inference(input_dir: str, output_dir: str, ckpt_dir: str, *extra: str) -> dict:
    """The bundle's inference command on ``input_dir`` with the model of ``ckpt_dir``."""
    args = ["--input", input_dir, "--output_dir", output_dir, "--ckpt_dir", ckpt_dir, *extra]
    return run_bundle("run", "inference", "--config_file", "configs/inference.json", *args)
