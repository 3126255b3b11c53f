"""Measure the service (``run serving``) on this machine against ``run inference`` on the same image files.

    python -m tools.serve_benchmark --ckpt_path models/model.pt --dataset_dir /tmp/mednist [--replicas 2]

Starts the server on a free loopback port, as a user does, then, with persistent HTTP connections from one
thread a client, one image (a MedNIST JPEG) a request, JSON with base64:
- throughput at saturation with 16 and 64 clients (requests/s over ``--requests`` after a warm-up), against the
  predicting rate of ``run inference`` in one process on the same files (its batches from the third on);
- p50 and p99 latency with 1 and 16 clients;
- the server's memory (resident set of the server and all its processes) at request 1,000 and 10,000 of a
  16-client run.
Run it alone: on 2 cores one other busy process halves every figure. Prints and writes a JSON report.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import glob
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tools.benchmark import cpu_name, rate, timed
from tools.bundle import BUNDLE_ROOT, workflow

MODEL = "mednist_classification"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(ckpt_path: str, port: int, replicas: int, log) -> subprocess.Popen:
    """``run serving`` of ``ckpt_path`` on ``port``, ready."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "serving", "--config_file",
           "['configs/inference.json','configs/serve.json']", "--ckpt_path", ckpt_path, "--port", str(port),
           "--replicas", str(replicas)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = subprocess.Popen(cmd, cwd=BUNDLE_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/v2/health/ready")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server stopped: see {log.name}")
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server was not ready in 5 minutes: see {log.name}")


def memory_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (Ray's processes), MB, from /proc (Linux)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            pass
    family, grew = {pid}, True
    while grew:
        more = {p for p, parent in parents.items() if parent in family} - family
        family, grew = family | more, bool(more)
    total = 0
    for p in family:
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return round(total / 1024, 1)


def load(port: int, bodies: list[bytes], clients: int, requests: int, on_count=None) -> dict:
    """``requests`` requests (cycling through ``bodies``) from ``clients`` threads, each with a persistent
    connection: requests/s, latency percentiles (ms), and failures."""
    counter, latencies, failed, lock = iter(range(requests)), [], [], threading.Lock()
    path = f"/v2/models/{MODEL}/infer"

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            began = time.perf_counter()
            connection.request("POST", path, bodies[i % len(bodies)], {"content-type": "application/json"})
            answer = connection.getresponse()
            answer.read()
            with lock:
                latencies.append(time.perf_counter() - began)
                if answer.status != 200:
                    failed.append(answer.status)
                if on_count is not None:
                    on_count(len(latencies))

    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: client(), range(clients)))
    wall = time.perf_counter() - began
    ms = sorted(1000 * x for x in latencies)
    return {"clients": clients, "requests": requests, "requests_per_s": round(requests / wall, 1),
            "p50_ms": round(ms[len(ms) // 2], 1), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
            "failed": len(failed)}  # fmt: skip


def inference_rate(ckpt_path: str, files: list[str], batch_size: int = 64) -> float:
    """``run inference``'s predicting rate (images/s) on ``files`` in this process, its batches from the third."""
    out = tempfile.mkdtemp(prefix="serve-benchmark-")
    parser = workflow("inference", run_id="inference", input=files, ckpt_path=ckpt_path, output_dir=out,
                      batch_size=batch_size).parser  # fmt: skip
    times = timed(parser.get_parsed_content("evaluator"))
    parser.get_parsed_content("inference")
    return round(rate(times[:-1], 2, batch_size), 1)


def main(argv=None) -> dict:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--ckpt_path", required=True, help="a trained model (model.pt or an export)")
    args.add_argument("--dataset_dir", required=True, help="a folder holding MedNIST/<class>/*.jpeg")
    args.add_argument("--images", type=int, default=1024, help="image files used (MedNIST's, every class)")
    args.add_argument("--requests", type=int, default=3000, help="requests a throughput or latency measurement")
    args.add_argument("--replicas", type=int, default=1)
    args.add_argument("--out", default="serve_benchmark.json")
    args = args.parse_args(argv)
    import torch

    files = sorted(glob.glob(os.path.join(args.dataset_dir, "MedNIST", "*", "*.jpeg")))[::7][: args.images]
    ckpt = os.path.abspath(args.ckpt_path)
    report = {"machine": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cores": os.cpu_count(), "replicas": args.replicas, "images": len(files)}  # fmt: skip
    report["run_inference_img_per_s"] = inference_rate(ckpt, files)
    bodies = []
    for path in files:
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [data]}]}
        bodies.append(json.dumps({**request, "outputs": [{"name": "label"}, {"name": "probabilities"}]}).encode())
    port = free_port()
    with open(os.path.join(tempfile.gettempdir(), "serve_benchmark.log"), "w") as log:
        server = start(ckpt, port, args.replicas, log)
        try:
            load(port, bodies, 16, 500)  # warm-up
            report["throughput"] = [load(port, bodies, c, args.requests) for c in (16, 64)]
            report["latency"] = [load(port, bodies, c, min(args.requests, 1000)) for c in (1, 16)]
            memory = {}
            load(
                port, bodies, 16, 10_000, lambda n: n in (1000, 10_000) and memory.setdefault(n, memory_mb(server.pid))
            )
            report["memory_mb_at_request"] = memory
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(120)
    best = max(t["requests_per_s"] for t in report["throughput"])
    report["served_of_run_inference"] = round(best / report["run_inference_img_per_s"], 3)
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
