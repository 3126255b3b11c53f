"""The model as a service: the Open Inference Protocol (KServe v2) over HTTP, on Ray Serve, with a page for people.

    python -m monai.bundle run serving --config_file "['configs/inference.json','configs/serve.json']" --port 8080

One Ray Serve deployment, ``--replicas`` copies of a :class:`Predictor` (the model loaded by the bundle's
allow-listed loaders, batching the images that arrive together with ``@serve.batch``) that is also the FastAPI
app: the protocol's routes, the page, a bearer token, the body and queue limits. One replica listens on the port
itself (direct ingress); several sit behind Ray's proxy there. :func:`application` builds it
from plain settings, so that ``serve run`` and a Serve config file run the same application on a Ray
cluster. Every image is read from the bytes a client sends (its kind told by its content), by the bundle's reader
and preprocessing, and answered with the fields of a row of ``predictions.csv``; a bad image costs its own element.
"""

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import threading

import numpy as np
import torch

from .errors import BundleError, first_line

logger = logging.getLogger(__name__)
MODEL = "mednist_classification"
OUTPUTS = {"label": "BYTES", "confidence": "FP32", "probabilities": "FP32", "ood_score": "FP32", "flag": "BYTES"}
OUTPUTS.update(error="BYTES", gradcam="BYTES")  # gradcam: a PNG of the image and its heat map, when asked for
BUNDLE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(BUNDLE, "scripts", "page.html")


class ProtocolError(ValueError):
    """A request the protocol refuses: answered with 400 and one line."""


def bytes_elements(buffer: bytes) -> list[bytes]:
    """The elements of a BYTES tensor in the binary-data extension: each a 4-byte little-endian length, then it."""
    elements, at = [], 0
    while at < len(buffer):
        size = int.from_bytes(buffer[at : at + 4], "little")
        if at + 4 + size > len(buffer):
            raise ProtocolError("a BYTES element runs past its tensor's binary data")
        elements.append(buffer[at + 4 : at + 4 + size])
        at += 4 + size
    return elements


def parse_request(body: bytes, header_length: str | None, max_images: int) -> tuple[list[bytes], dict]:
    """The images of an inference request (its ``image`` input: BYTES, base64 strings in JSON or binary data;
    at most ``max_images``, the batch size, as Triton's ``max_batch_size``) and the outputs asked for (name:
    binary or not), or a :class:`ProtocolError`."""
    try:
        size = int(header_length) if header_length is not None else len(body)
        request = json.loads(body[:size])
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"the request is not JSON ({str(e)[:80]})") from e
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError('the request needs one input, "image"')
    tensor, binary = inputs[0], body[size:]
    if tensor.get("name") != "image" or tensor.get("datatype") != "BYTES":
        raise ProtocolError('the input must be "image", of datatype BYTES (each element an image file)')
    parameters = tensor.get("parameters") or {}
    if "binary_data_size" in parameters:
        images = bytes_elements(binary[: int(parameters["binary_data_size"])])
    elif isinstance(tensor.get("data"), list):
        try:
            images = [base64.b64decode(x, validate=True) for x in tensor["data"]]
        except (ValueError, TypeError) as e:
            raise ProtocolError("each image of a JSON request is a base64 string") from e
    else:
        raise ProtocolError('the input "image" has no data')
    shape = tensor.get("shape")
    if shape not in ([len(images)], [len(images), 1]) or not images:
        raise ProtocolError(f"the input's shape {str(shape)[:40]} is not the {len(images)} images it holds")
    if len(images) > max_images:
        raise ProtocolError(f"{len(images)} images in one request: at most {max_images} (the model's batch size)")
    options = request.get("parameters") or {}
    asked = request.get("outputs") or [{"name": n} for n in OUTPUTS if n != "gradcam"]
    outputs = {}
    for output in asked:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in OUTPUTS:
            raise ProtocolError(f"no output {str(name)[:40]!r}: the outputs are {', '.join(OUTPUTS)}")
        binary_output = (output.get("parameters") or {}).get("binary_data", options.get("binary_data_output", False))
        outputs[name] = bool(binary_output)
    return images, outputs


def response(rows: list[dict], classes, outputs: dict) -> tuple[bytes, dict]:
    """The response body and headers for ``rows`` (fields of predictions.csv rows), the ``outputs`` asked for, in
    JSON or, where asked, in the binary-data extension after the JSON."""
    values = {
        "label": [r.get("label", "") for r in rows],
        "confidence": [float(r.get("confidence") or "nan") for r in rows],
        "probabilities": [[float(r.get(c) or "nan") for c in classes] for r in rows],
        "ood_score": [float(r.get("ood_score") or "nan") for r in rows],
        "flag": [r.get("flag", "") for r in rows],
        "error": [r.get("error", "") for r in rows],
        "gradcam": [r.get("gradcam", b"") for r in rows],
    }
    tensors, binary = [], []
    for name, as_binary in outputs.items():
        data = values[name]
        shape = [len(rows), len(classes)] if name == "probabilities" else [len(rows)]
        tensor = {"name": name, "datatype": OUTPUTS[name], "shape": shape}
        if OUTPUTS[name] == "BYTES":
            encoded = [x if isinstance(x, bytes) else str(x).encode() for x in data]
            if as_binary:
                binary.append(b"".join(len(x).to_bytes(4, "little") + x for x in encoded))
            else:  # text as text; a PNG as base64
                tensor["data"] = [base64.b64encode(x).decode() if name == "gradcam" else x.decode() for x in encoded]
        elif as_binary:
            binary.append(np.asarray(data, "<f4").tobytes())
        else:
            tensor["data"] = [x if x == x else None for x in np.asarray(data, "<f4").ravel().tolist()]  # NaN: null
        if as_binary:
            tensor["parameters"] = {"binary_data_size": len(binary[-1])}
        tensors.append(tensor)
    header = json.dumps({"model_name": MODEL, "outputs": tensors}).encode()
    if not binary:
        return header, {"content-type": "application/json"}
    return header + b"".join(binary), {"inference-header-content-length": str(len(header))}


def metadata(classes, version: str, max_batch_size: int) -> dict:
    """The model's metadata (the protocol's), with its classes and the most images a request holds."""
    outputs = [{"name": n, "datatype": t, "shape": [-1, len(classes)] if n == "probabilities" else [-1]}
               for n, t in OUTPUTS.items()]  # fmt: skip
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    return {"name": MODEL, "versions": [version], "platform": "pytorch", "inputs": inputs, "outputs": outputs,
            "classes": list(classes), "max_batch_size": max_batch_size}  # fmt: skip


class Predictor:
    """One copy of the model (``model_path`` on ``device``: a model.pt or an export, read by the bundle's loaders
    with its calibration), preprocessing (``reader``, then ``preprocessing`` after its loader) and predicting
    the images that arrive together as one batch, each answered with a row of predictions.csv."""

    def __init__(
        self, model_path: str, device, reader, preprocessing, low_confidence: float, gradcam_layer=None, replicas=1
    ):
        from .inputs import SafeDataset
        from .outputs import FeatureHook
        from .trained_model import TrainedModel

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(replicas)))  # the machine's cores, shared
        self.model = TrainedModel(model_path, device).load()
        description = self.model.description
        self.dataset = SafeDataset([], preprocessing, description.image_size, description.in_channels, reader)
        self.hook = FeatureHook(self.model.network, description.feature_layer)
        self.low_confidence, self.layer = float(low_confidence), gradcam_layer or description.gradcam_layer

    def rows(self, requests: list[tuple[bytes, bool]]) -> list[dict]:
        """The rows of a batch of (image bytes, with Grad-CAM) requests, as inference writes them."""
        from .pictures import overlay_png
        from .predictions import prediction_rows

        items = [self.dataset.prepared({"data": data, "path": f"image {i}"}) for i, (data, _) in enumerate(requests)]
        batch = {k: [item[k] for item in items] for k in ("path", "error", "min_side", "sop_instance_uid")}
        batch["image"] = torch.stack([item["image"] for item in items])
        with torch.no_grad():
            logits = self.model.network(batch["image"].to(self.model.device)).float().cpu()
        outputs = {"logits": logits, "features": self.hook.take(), "labels": None, "batch": batch}
        rows = prediction_rows(outputs, self.model.calibration, self.model.classes, self.low_confidence)
        for row, item, (_, gradcam) in zip(rows, items, requests):
            row["gradcam"] = b""
            if gradcam and not row["error"] and self.model.explainable is not None:
                row["gradcam"] = overlay_png(self.model.explainable, item["image"], self.layer)
        return rows


def application(settings: dict):
    """The Ray Serve application of plain ``settings`` (the keys of configs/serve.json; ``serve run`` and a Serve
    config file pass them as its arguments): ``replicas`` copies of one deployment, each answering HTTP and
    batching its images (one hop from Ray's proxy: on 2 cores a second deployment cost a third of the rate)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from ray import serve

    app = FastAPI(title="MedNIST classification", docs_url=None, redoc_url=None, openapi_url=None)
    batch, queued = int(settings["max_batch_size"]), int(settings["max_queued"])
    limit, file_limit, token = int(settings["max_request_bytes"]), int(settings["max_file_bytes"]), settings["token"]

    def error(status: int, message: str, headers=None):
        return JSONResponse({"error": message}, status, headers)

    @serve.deployment(
        max_ongoing_requests=queued + batch,  # the replica counts images itself: 503 past max_queued
        ray_actor_options={"num_cpus": float(settings.get("replica_cpus", 1))},  # reserved on its node
        logging_config={"enable_access_log": False},  # a log line a request costs more than batching saves
        graceful_shutdown_wait_loop_s=0.2,  # a stop checks often for a moment with no request in flight
    )
    @serve.ingress(app)
    class Service(Predictor):
        def __init__(self):
            super().__init__(settings["model_path"], settings["device"], settings["image_reader"],
                             settings["preprocessing"], settings["low_confidence"], settings.get("gradcam_layer"),
                             settings["replicas"])  # fmt: skip
            self.waiting, self.stopping = 0, False  # images in this replica, not yet answered; refusing new ones

        def stop_taking(self) -> None:  # called before a stop: Ray drains a replica that serves its port itself
            self.stopping = True  # only once no request is in flight, which new ones would put off forever

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=float(settings["batch_wait_s"]))
        async def predict(self, requests: list[tuple[bytes, bool]]) -> list[dict]:
            return self.rows(requests)  # blocking: what arrives meanwhile waits, and makes the next batch

        def refused(self, request: Request):
            given = request.headers.get("authorization", "").encode()
            if token and not hmac.compare_digest(given, f"Bearer {token}".encode()):
                return error(401, "a bearer token is needed", {"www-authenticate": "Bearer"})
            return None

        @app.get("/v2/health/live")
        async def live(self):  # a replica answers once its model is loaded; Ray Serve replaces one that dies
            return {"live": True}

        @app.get("/v2/health/ready")
        @app.get("/v2/models/" + MODEL + "/ready")
        async def ready(self):  # not while stopping: a load balancer sends no more
            return error(503, "the server is stopping") if self.stopping else {"ready": True}

        @app.get("/v2/models/" + MODEL)
        async def model_metadata(self, request: Request):
            return self.refused(request) or metadata(self.model.classes, settings["version"], batch)

        @app.get("/", response_class=HTMLResponse)
        async def page(self):  # static, and public: a browser cannot send a token to open it; the page asks for one
            with open(PAGE) as f:
                return f.read()

        @app.post("/v2/models/" + MODEL + "/infer")
        async def infer(self, request: Request):
            refused = self.refused(request)
            if refused:
                return refused
            if self.stopping:
                return error(503, "the server is stopping", {"retry-after": "1", "connection": "close"})
            declared = request.headers.get("content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                return error(413, f"the request is over {limit:,} bytes")
            body = bytearray()
            async for chunk in request.stream():  # a body without a length is cut off at the limit
                body += chunk
                if len(body) > limit:
                    return error(413, f"the request is over {limit:,} bytes")
            try:
                header = request.headers.get("inference-header-content-length")
                images, outputs = parse_request(bytes(body), header, batch)
            except ProtocolError as e:
                return error(400, str(e))
            if self.waiting + len(images) > queued:
                return error(503, "the server is busy", {"retry-after": "1"})
            self.waiting += len(images)
            try:
                rows = await asyncio.gather(*[self.answer(data, "gradcam" in outputs) for data in images])
            finally:
                self.waiting -= len(images)
            content, headers = response(rows, self.model.classes, outputs)
            return Response(content, headers=headers, media_type=headers.get("content-type"))

        async def answer(self, data: bytes, gradcam: bool) -> dict:
            if len(data) > file_limit:
                return {"error": f"the image is over {file_limit:,} bytes"}
            return await self.predict((data, gradcam))

    return Service.options(num_replicas=int(settings["replicas"])).bind()


def build(args: dict):
    """A Ray Serve application builder (``serve run scripts.serving:build key=value ...`` or a Serve config file,
    deploy/serve_config.yaml): the bundle's serving workflow made with ``args`` as its overrides, as the command
    makes it, and its :func:`application`."""
    from monai.bundle import ConfigWorkflow

    configs = [os.path.join(BUNDLE, "configs", name) for name in ("inference.json", "serve.json")]
    args = {"host": "0.0.0.0", **args}  # a cluster's proxies listen beyond loopback: a token, or insecure: true
    flow = ConfigWorkflow(config_file=configs, run_id="serving", bundle_root=BUNDLE, **args)
    flow.initialize()
    flow.parser.get_parsed_content("check")
    return application(flow.parser.get_parsed_content("server").settings)


def check_address(host: str, token_file, insecure) -> str | None:
    """The bearer token of ``token_file`` (one line, at least 16 characters), or None; refused before anything
    starts: a host beyond loopback without a token, unless ``insecure``."""
    from .checks import as_bool
    from .files import read_text

    token = None
    if token_file:
        fix = "pass --token_file FILE holding one line of at least 16 characters (e.g. `openssl rand -hex 24`)."
        token = read_text(str(token_file), "--token_file", 4096, fix).strip()
        if len(token) < 16 or any(c.isspace() for c in token):
            raise BundleError(f"--token_file {token_file} holds no token of at least 16 characters.", fix)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError as e:
        raise BundleError(
            f"--host {host!r} is not an address to listen on.", "pass --host 127.0.0.1 (or 0.0.0.0)."
        ) from e
    if not loopback and token is None and not as_bool(insecure, "insecure"):
        raise BundleError(
            f"--host {host} listens beyond this machine, and no --token_file makes its routes need a token.",
            "pass --token_file FILE (clients send Authorization: Bearer TOKEN), or --insecure true.",
        )
    return token


# Ray Serve's direct ingress (pinned Ray): the ingress replica serves HTTP itself, its port reused at once when the
# engine replaces it, and a stop drains the requests in flight without waiting for a load balancer
DIRECT_INGRESS = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_PORT_QUARANTINE_S": "0",
                  "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}  # fmt: skip


def listening(host: str, port: int, reuse: bool = True) -> socket.socket:
    """A socket listening on ``host``:``port`` (0: a free port), IPv4 or IPv6 as ``host`` is written; without
    ``reuse`` it binds as Ray's direct ingress does (a port that closed connections still hold is refused)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse))
        sock.bind((host, port))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


class Server:
    """The workflow step :meth:`run`: Ray Serve on this machine (``host``:``port``) running :func:`application`
    of ``settings``, until SIGINT or SIGTERM, which finish the requests in flight."""

    def __init__(self, settings: dict, host: str = "127.0.0.1", port: int = 8080, token_file=None, insecure=False):
        self.settings, self.host, self.port = dict(settings), str(host), int(port)
        self.direct = int(self.settings["replicas"]) == 1  # the replica answers --port itself: see run()
        self.settings["token"] = check_address(self.host, token_file, insecure)
        try:
            listening(self.host, self.port, reuse=not self.direct).close()
        except OSError as e:
            raise BundleError(f"--port {self.port} of {self.host} cannot be listened on ({e.strerror}).",
                              "pass another --port, or stop what listens there (or wait a minute for the "
                              "connections of a server stopped there to close).") from e  # fmt: skip
        self.settings["replica_cpus"] = min(1.0, (os.cpu_count() or 1) / int(self.settings["replicas"]))

    def run(self) -> None:
        proxy_port = self.port
        if self.direct:  # the replica answers --port itself: Ray's proxy hop halved the rate
            with listening(self.host, 0) as free:  # the proxy, still started, on a port of its own
                proxy_port = free.getsockname()[1]
            os.environ.update(DIRECT_INGRESS, RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(self.port),
                              RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(self.port + 1))  # fmt: skip
        import ray
        from ray import serve

        ray.init(address="local", runtime_env={"py_modules": [os.path.join(BUNDLE, "scripts")]},  # a Ray of its own
                 include_dashboard=False, logging_level=logging.WARNING, configure_logging=False)  # fmt: skip
        serve.start(http_options={"host": self.host, "port": proxy_port})
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        try:
            serve.run(application(self.settings), name=MODEL, route_prefix="/")
            logger.info(f"serving {self.settings['model_path']} at http://{self.host}:{self.port}/ "
                        f"({self.settings['replicas']} replica(s)); Ctrl-C stops it")  # fmt: skip
            print(f"SERVING http://{self.host}:{self.port}/", flush=True)
            stop.wait()
            logger.info("stopping: finishing the requests in flight")
            if self.direct:
                try:
                    serve.get_deployment_handle("Service", MODEL).stop_taking.remote().result(timeout_s=10)
                except Exception as e:  # e.g. no replica now: stop anyway
                    logger.warning(f"the replica was not told to refuse new requests ({first_line(e)}): stopping")
            serve.delete(MODEL)  # each replica finishes its requests in flight, then stops
        finally:
            serve.shutdown()
            ray.shutdown()
