"""The model as a service: a real server (``run serving``, Ray Serve, 2 replicas, a token) on a free loopback port,
called with tritonclient.http, plain HTTP and a headless Chromium; its limits, a killed replica and SIGTERM."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import BUNDLE, CLASSES, bundle_error, infer, parser
from scripts.predictions import read_predictions

pytest.importorskip("ray.serve")
MODEL = "mednist_classification"
TOKEN = "test-token-0123456789abcdef"
SERVE = "['configs/inference.json','configs/serve.json']"
LIMITS = {"max_request_bytes": 1_000_000, "max_file_bytes": 200_000, "max_queued": 4, "batch_size": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replicas() -> list[int]:
    """The process ids of this machine's replicas (Ray names its worker processes after them)."""
    found = subprocess.run(["pgrep", "-f", "ServeReplica:" + MODEL + ":Service"], capture_output=True)
    return [int(p) for p in found.stdout.split()]


class Client:
    """Plain HTTP to the server (one connection a call), with the token unless told otherwise."""

    def __init__(self, port: int):
        self.port = port

    def call(self, method, path, body=None, headers=None, token=TOKEN, timeout=120):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = dict(headers or {})
        if token:
            headers["authorization"] = f"Bearer {token}"
        connection.request(method, path, body=body, headers=headers)
        answer = connection.getresponse()
        content = answer.read()
        connection.close()
        return answer.status, dict(answer.getheaders()), content

    def infer(self, images: list[bytes], outputs=("label", "probabilities", "error"), **kwargs):
        request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                               "data": [base64.b64encode(x).decode() for x in images]}],
                   "outputs": [{"name": n} for n in outputs]}  # fmt: skip
        status, headers, content = self.call("POST", f"/v2/models/{MODEL}/infer", json.dumps(request), **kwargs)
        body = json.loads(content) if headers.get("content-type") == "application/json" else {"error": content}
        return status, headers, ({o["name"]: o["data"] for o in body["outputs"]} if status == 200 else body)


def listener(port: int) -> int | None:
    """The process listening on ``port`` (from /proc: Linux), or None."""
    inodes = set()
    for table in filter(os.path.exists, ("/proc/net/tcp", "/proc/net/tcp6")):
        with open(table) as f:
            rows = [line.split() for line in f.readlines()[1:]]
        inodes |= {row[9] for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A"}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            pass
    return None


def start_server(folder, model, count: int, **settings) -> dict:
    """``run serving`` of ``model`` as a user starts it (``count`` replicas, ``settings`` as --key value), ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "monai.bundle", "run", "serving", "--config_file", SERVE, "--port", str(port),
           "--ckpt_path", str(model), "--replicas", str(count)]  # fmt: skip
    for key, value in settings.items():
        cmd += [f"--{key}", str(value)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    log = open(folder / "server.log", "w+")
    process = subprocess.Popen(cmd, cwd=BUNDLE, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = Client(port)
    for _ in range(240):
        try:
            if client.call("GET", "/v2/health/ready", timeout=5, token=None)[0] == 200 and len(replicas()) == count:
                return {"process": process, "client": client, "port": port, "log": log}
        except OSError:
            pass
        assert process.poll() is None, (folder / "server.log").read_text()[-4000:]
        time.sleep(0.5)
    process.kill()
    pytest.fail("the server was not ready in 120 s:\n" + (folder / "server.log").read_text()[-4000:])


def stop_server(server: dict) -> None:
    if server["process"].poll() is None:
        server["process"].send_signal(signal.SIGINT)
        try:
            server["process"].wait(60)
        except subprocess.TimeoutExpired:
            server["process"].kill()
    server["log"].close()


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """``run serving`` of the trained model: 2 replicas behind Ray's proxy, a token file, small limits."""
    folder = tmp_path_factory.mktemp("serving")
    (folder / "token").write_text(TOKEN + "\n")
    server = start_server(folder, trained / "models" / "model.pt", 2, token_file=folder / "token", **LIMITS)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def expected(trained, mixed_folder, tmp_path_factory) -> dict:
    """``run inference``'s rows for the mixed folder (regular files), by file name."""
    out = tmp_path_factory.mktemp("expected")
    infer(trained, out, mixed_folder["dir"])
    return {os.path.basename(r["path"]): r for r in read_predictions(out / "predictions.csv", CLASSES)}


def sent_files(mixed_folder) -> dict:
    """The regular files of the mixed folder (a service gets bytes, never a path): name -> bytes."""
    paths = {p.name: p for p in mixed_folder["dir"].rglob("*") if p.is_file()}
    return {n: paths[n].read_bytes() for n in sorted(paths)}


def test_health_is_open_and_everything_else_needs_the_token(server):
    client = server["client"]
    assert client.call("GET", "/v2/health/live", token=None)[0] == 200
    assert client.call("GET", f"/v2/models/{MODEL}/ready", token=None)[0] == 200
    for token in (None, "wrong-token-0123456789abcdef"):
        status, headers, _ = client.call("GET", f"/v2/models/{MODEL}", token=token)
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert client.infer([b"x"], token=token)[0] == 401
    status, _, content = client.call("GET", f"/v2/models/{MODEL}")
    meta = json.loads(content)
    assert status == 200 and meta["classes"] == list(CLASSES) and meta["inputs"][0]["datatype"] == "BYTES"
    assert meta["max_batch_size"] == LIMITS["batch_size"]
    assert {o["name"] for o in meta["outputs"]} >= {"label", "confidence", "probabilities", "ood_score", "error"}


def test_tritonclient_gets_the_answers_of_run_inference(server, mixed_folder, expected):
    """One binary-data request of every regular file of the mixed folder (DICOM, NIfTI, 16-bit, RGBA, bad files):
    labels, probabilities, OOD scores and errors as ``run inference`` wrote them."""
    import tritonclient.http as triton

    files = sent_files(mixed_folder)
    client = triton.InferenceServerClient(f"127.0.0.1:{server['port']}")
    headers = {"authorization": f"Bearer {TOKEN}"}
    assert client.is_server_ready() and client.is_model_ready(MODEL, headers=headers)
    names = ["label", "probabilities", "ood_score", "flag", "error"]
    outputs = [triton.InferRequestedOutput(n, binary_data=True) for n in names]
    got = {n: [] for n in names}
    sent = list(files.values())
    for start in range(0, len(sent), LIMITS["batch_size"]):  # requests of at most the batch size
        image = triton.InferInput("image", [len(sent[start : start + 4])], "BYTES")
        image.set_data_from_numpy(np.array(sent[start : start + 4], dtype=object), binary_data=True)
        result = client.infer(MODEL, [image], outputs=outputs, headers=headers)
        for n in names:
            got[n].extend(result.as_numpy(n))
    got = {n: np.stack(v) for n, v in got.items()}
    assert got["probabilities"].shape == (len(files), len(CLASSES))
    for i, name in enumerate(files):
        row = expected[name]
        error = got["error"][i].decode()
        if name in mixed_folder["good"]:
            assert error == "" and got["label"][i].decode() == row["label"], name
            assert got["probabilities"][i] == pytest.approx([float(row[c]) for c in CLASSES], abs=1e-5), name
            assert got["ood_score"][i] == pytest.approx(float(row["ood_score"]), rel=1e-4, abs=1e-4), name
            assert got["flag"][i].decode() == row["flag"], name
        else:  # a bad file costs its own element; told by its bytes, not its name
            assert error and got["label"][i].decode() == "" and np.isnan(got["probabilities"][i]).all(), name
            if name != "notes.txt":
                assert error == row["error"], name


def test_plain_json_request_with_gradcam(server, mixed_folder, expected):
    data = (mixed_folder["dir"] / "hand.jpeg").read_bytes()
    status, _, out = server["client"].infer([data], outputs=("label", "confidence", "gradcam"))
    assert status == 200 and out["label"] == [expected["hand.jpeg"]["label"]]
    assert out["confidence"][0] == pytest.approx(float(expected["hand.jpeg"]["confidence"]), abs=1e-5)
    with Image.open(io.BytesIO(base64.b64decode(out["gradcam"][0]))) as picture:
        assert picture.format == "PNG" and picture.size == (256, 256) and picture.mode == "RGB"
        assert np.asarray(picture).std() > 10  # an image, not a blank


def test_bad_requests_get_one_line_and_nothing_breaks(server, mixed_folder):
    client = server["client"]
    path = f"/v2/models/{MODEL}/infer"
    status, _, content = client.call("POST", path, b"{not json")
    assert status == 400 and json.loads(content)["error"].startswith("the request is not JSON")
    status, _, content = client.call("POST", path, json.dumps({"inputs": [{"name": "img", "datatype": "BYTES"}]}))
    assert status == 400 and 'the input must be "image"' in json.loads(content)["error"]
    status, _, content = client.call(
        "POST",
        path,
        json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}),
    )
    assert status == 400 and json.loads(content)["error"] == "each image of a JSON request is a base64 string"
    status, _, body = client.infer([b"x"] * 5)
    assert status == 400 and body["error"] == "5 images in one request: at most 4 (the model's batch size)"
    # a body over max_request_bytes: refused by its declared length, and, sent without one, cut off at the limit
    big = b'{"inputs": [' + b" " * LIMITS["max_request_bytes"] + b"]}"
    status, _, content = client.call("POST", path, big)
    assert status == 413 and "over 1,000,000 bytes" in json.loads(content)["error"]
    chunks = iter([big[i : i + 65536] for i in range(0, len(big), 65536)])
    status, _, content = client.call("POST", path, chunks)  # an iterator: sent chunked, with no length
    assert status == 413 and "over 1,000,000 bytes" in json.loads(content)["error"]
    # a file over max_file_bytes costs its element only
    good = (mixed_folder["dir"] / "cxr.jpg").read_bytes()
    status, _, out = client.infer([good, good + b"\0" * LIMITS["max_file_bytes"]])
    assert status == 200 and out["error"] == ["", "the image is over 200,000 bytes"] and out["label"][1] == ""
    assert client.call("GET", "/v2/health/ready", token=None)[0] == 200


def test_a_full_queue_answers_503_with_retry_after(server, mixed_folder):
    """64 requests at once against 2 replicas that take 8 and queue 4: the rest are told to come back."""
    data = (mixed_folder["dir"] / "hand.jpeg").read_bytes()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        answers = list(pool.map(lambda _: server["client"].infer([data] * 4), range(64)))
        ready = server["client"].call("GET", "/v2/health/ready", token=None)[0]
    statuses = [a[0] for a in answers]
    assert set(statuses) == {200, 503} and ready == 200, statuses
    assert all(a[1]["retry-after"] == "1" for a in answers if a[0] == 503)


def test_the_page_in_a_browser(server, mixed_folder, expected):
    """Headless Chromium opens the page, gives the token, uploads an image and shows its label, bars, Grad-CAM."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None or shutil.which("chromedriver") is None:
        assert os.environ.get("CI") != "true", "CI installs chromium and chromium-driver"
        pytest.skip("no chromium and chromedriver here")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(f"http://127.0.0.1:{server['port']}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "access").is_displayed())  # the server needs its token
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.ID, "use").click()
        wait.until(lambda d: not d.find_element(By.ID, "access").is_displayed())
        driver.find_element(By.ID, "file").send_keys(str(mixed_folder["dir"] / "cxr.jpg"))
        wait.until(lambda d: d.find_element(By.ID, "label").text)
        row = expected["cxr.jpg"]
        assert driver.find_element(By.ID, "label").text == row["label"]
        bars = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")
        shown = {b.get_attribute("data-class"): float(b.get_attribute("data-probability")) for b in bars}
        assert shown == pytest.approx({c: float(row[c]) for c in CLASSES}, abs=1e-5)
        assert driver.find_element(By.ID, "gradcam").get_attribute("src").startswith("data:image/png;base64,")
        assert driver.find_element(By.ID, "error").text == ""
        driver.find_element(By.ID, "file").send_keys(str(mixed_folder["dir"] / "truncated.jpeg"))
        wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert "cannot read image" in driver.find_element(By.ID, "error").text
        assert driver.find_element(By.ID, "label").text == ""
    finally:
        driver.quit()


def test_a_killed_replica_loses_no_request(server, mixed_folder, expected):
    """300 requests from 8 clients (which retry a 503 as told); one replica SIGKILLed after the 60th answer: every
    request ends, those in the killed replica (at most --max_queued) with an error, none hangs; the engine starts
    a new replica and all answer again."""
    data = (mixed_folder["dir"] / "hand.jpeg").read_bytes()
    before = replicas()
    done, killed = [], []

    def one(_):
        for _ in range(100):
            status, headers, out = server["client"].infer([data], timeout=60)
            if status != 503:
                break
            time.sleep(float(headers["retry-after"]) / 10)
        done.append(status)
        if len(done) == 60 and not killed:
            killed.append(before[0])
            os.kill(before[0], signal.SIGKILL)
        return status, out

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(300)))  # a hung request raises socket.timeout here
    assert killed and len(answers) == 300
    failed = [status for status, _ in answers if status != 200]  # those in the killed replica: an error
    assert len(failed) <= LIMITS["max_queued"] and set(failed) <= {500, 503}, failed
    labels = {tuple(out["label"]) for status, out in answers if status == 200}
    assert labels == {(expected["hand.jpeg"]["label"],)}
    for _ in range(120):  # the engine replaces it
        now = replicas()
        if len(now) == 2 and killed[0] not in now:
            break
        time.sleep(0.5)
    assert len(now) == 2 and killed[0] not in now, now
    assert server["client"].infer([data])[0] == 200


def test_sigterm_finishes_the_requests_in_flight(server, mixed_folder):
    sigterm_finishes_the_requests_in_flight(server, (mixed_folder["dir"] / "hand.jpeg").read_bytes())


def sigterm_finishes_the_requests_in_flight(server: dict, data: bytes, clients: int = 0) -> list:
    """SIGTERM with 3 requests in flight (and ``clients`` threads sending more until the server is gone): the 3
    answered, the server gone; the statuses the clients got (inference's, and readiness's after a 503)."""
    statuses = []

    def client():
        while server["process"].poll() is None:
            try:
                statuses.append(server["client"].infer([data], timeout=60)[0])
                if statuses[-1] == 503:  # come back later, as Retry-After says (sooner here); ready?
                    time.sleep(0.2)
                    statuses.append(("ready", server["client"].call("GET", "/v2/health/ready", token=None)[0]))
            except OSError:  # refused: the replica's listener is closed
                time.sleep(0.05)

    pool = concurrent.futures.ThreadPoolExecutor(max(1, clients))
    running = [pool.submit(client) for _ in range(clients)]
    for _ in range(1200):  # the clients are answered
        if len(statuses) >= 2 * clients:
            break
        assert server["process"].poll() is None and not any(r.done() for r in running)
        time.sleep(0.05)
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(data).decode()]}],
               "outputs": [{"name": "label"}, {"name": "gradcam"}]}  # fmt: skip
    connections = []
    for _ in range(3):  # sent whole before the signal (fewer than --max_queued)
        connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=120)
        connection.request("POST", f"/v2/models/{MODEL}/infer", json.dumps(request),
                           {"authorization": f"Bearer {TOKEN}"})  # fmt: skip
        connections.append(connection)
    time.sleep(0.1 if clients else 0)  # taken in before the signal, among the clients' requests
    server["process"].send_signal(signal.SIGTERM)
    answers = [c.getresponse() for c in connections]
    bodies = [(a.status, a.read()) for a in answers]
    assert [s for s, _ in bodies] == [200] * 3, bodies
    assert server["process"].wait(60) == 0
    assert not replicas()
    [r.result() for r in running]
    pool.shutdown()
    return statuses


def test_one_replica_answers_on_its_port_comes_back_and_stops_cleanly(
    server, trained, mixed_folder, expected, tmp_path
):
    """The default, one replica: it listens on --port itself (no proxy hop); SIGKILLed, the engine starts another
    on the same port; SIGTERM under load finishes the requests in flight."""
    stop_server(server)  # its replicas would share the 2 cores and the count of replica processes
    (tmp_path / "token").write_text(TOKEN)
    one = start_server(tmp_path, trained / "models" / "model.pt", 1, token_file=tmp_path / "token")
    data = (mixed_folder["dir"] / "hand.jpeg").read_bytes()
    try:
        (first,) = replicas()
        assert listener(one["port"]) == first
        status, _, out = one["client"].infer([data])
        assert status == 200 and out["label"] == [expected["hand.jpeg"]["label"]]
        os.kill(first, signal.SIGKILL)
        for _ in range(120):  # the engine replaces it, on the same port
            now = replicas()
            if len(now) == 1 and first not in now and listener(one["port"]) == now[0]:
                break
            time.sleep(0.5)
        assert len(now) == 1 and first not in now and listener(one["port"]) == now[0], now
        answers = [one["client"].infer([data], timeout=60)[0] for _ in range(2)]
        assert answers == [200, 200]
        statuses = sigterm_finishes_the_requests_in_flight(one, data, clients=4)
        # under load: new requests told to come back while those in flight finish, none cut by Ray's force-kill
        assert set(statuses) <= {200, 503, ("ready", 503)} and {200, 503} <= set(statuses), statuses
        one["log"].flush()
        assert "force-killing" not in (tmp_path / "server.log").read_text()
    finally:
        stop_server(one)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"host": "0.0.0.0"}, "--host 0.0.0.0 listens beyond this machine, and no --token_file"),
        ({"host": "my server"}, "--host 'my server' is not an address to listen on."),
        ({"port": 70000}, "--port 70000 is not a port number"),
        ({"replicas": 0}, "--replicas"),
        ({"token_file": "SHORT"}, "holds no token of at least 16 characters"),
        ({"token_file": "MISSING"}, "--token_file"),
        ({"port": "BUSY"}, "cannot be listened on (Address already in use"),
    ],
)
def test_unsafe_or_wrong_settings_are_refused_before_starting(trained, tmp_path, overrides, message):
    (tmp_path / "short").write_text("abc\n")
    busy = socket.create_server(("127.0.0.1", 0))  # a port something else listens on
    paths = {"SHORT": str(tmp_path / "short"), "MISSING": str(tmp_path / "none"), "BUSY": busy.getsockname()[1]}
    overrides = {k: paths.get(v, v) for k, v in overrides.items()}
    config = parser(["inference", "serve"], ckpt_path=str(trained / "models" / "model.pt"), **overrides)
    with busy, bundle_error(message):
        config.get_parsed_content("check")
        config.get_parsed_content("server")


def test_beyond_loopback_with_a_token_or_insecure(trained, tmp_path):
    (tmp_path / "token").write_text(TOKEN)
    for extra in ({"token_file": str(tmp_path / "token")}, {"insecure": True}):
        config = parser(["inference", "serve"], ckpt_path=str(trained / "models" / "model.pt"), host="0.0.0.0", **extra)
        server = config.get_parsed_content("server")
        assert server.settings["token"] == (TOKEN if "token_file" in extra else None)


def test_an_ipv6_loopback_host_is_checked_as_ipv6(trained):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server = parser(
        ["inference", "serve"], ckpt_path=str(trained / "models" / "model.pt"), host="::1"
    ).get_parsed_content("server")
    assert server.host == "::1" and server.settings["token"] is None  # loopback: no token needed, its port free


def test_the_cluster_and_kubernetes_files_run_this_application(trained, tmp_path):
    """deploy/serve_config.yaml is a valid Serve config whose builder makes the application (and, with no token,
    refuses its network-wide proxies); deploy/kserve.yaml's container passes keys the serving workflow checks."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from scripts.serving import build

    with open(os.path.join(BUNDLE, "deploy", "serve_config.yaml")) as f:
        config = ServeDeploySchema(**yaml.safe_load(f))
    (app,) = config.applications
    assert app.import_path == "scripts.serving:build" and app.route_prefix == "/"
    (tmp_path / "token").write_text(TOKEN)
    args = {**app.args, "ckpt_path": str(trained / "models" / "model.pt"), "token_file": str(tmp_path / "token")}
    assert type(build(args)).__name__ == "Application"
    with bundle_error("listens beyond this machine, and no --token_file"):
        build({k: v for k, v in args.items() if k != "token_file"})
    with open(os.path.join(BUNDLE, "deploy", "kserve.yaml")) as f:
        (container,) = yaml.safe_load(f)["spec"]["predictor"]["containers"]
    given = dict(zip(container["args"][::2], container["args"][1::2]))
    given = {k.lstrip("-"): yaml.safe_load(v) for k, v in given.items() if k != "--token_file"}  # as fire reads them
    with open(os.path.join(BUNDLE, "deploy", "Dockerfile")) as f:
        entry = json.loads(next(line for line in f if line.startswith("ENTRYPOINT"))[len("ENTRYPOINT") :])
    assert entry[:4] == ["python", "-m", "monai.bundle", "run"] and container["ports"][0]["containerPort"] == 8080
    config = parser(["inference", "serve"], ckpt_path=str(trained / "models" / "model.pt"), host="0.0.0.0",
                    token_file=str(tmp_path / "token"), **given)  # fmt: skip
    config.get_parsed_content("check")
    assert config.get_parsed_content("server").settings["replicas"] == int(given["replicas"])
