"""Model files are accepted only as the bundle writes them (scripts.model_file, scripts.programs): a deterministic
fuzz of tampered .pt2, TorchScript and ONNX files of a small DenseNet (the bundle's writers, on a network small
enough that each case is checked in milliseconds) and of model.pt archives, each refused in one line or loading the
genuine weights, no payload run, none slow; the controls show torch's, TorchScript's and ONNX Runtime's own loaders
running (or reading) what the bundle's loader refuses."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import warnings
import zipfile
from collections import Counter

import pytest
import torch

from conftest import bundle_error, infer


class Payload:
    """Unpickling this creates ``path``: the side effect a tampered model file must never get to cause."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def small_network():
    from monai.networks.nets import DenseNet

    torch.manual_seed(0)
    return DenseNet(2, 1, 6, init_features=8, growth_rate=4, block_config=(2, 2, 2, 2), bn_size=2).eval()


def archive(entries, compression=zipfile.ZIP_STORED) -> bytes:
    """A zip archive of ``(name, bytes)`` entries, in that order, duplicates kept."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as zf:
        warnings.simplefilter("ignore")  # "Duplicate name"
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = compression
            zf.writestr(info, data)
    return buffer.getvalue()


def entries_of(data: bytes) -> list:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def replaced(genuine: list, name: str, data: bytes) -> bytes:
    return archive([(n, data if n == name else d) for n, d in genuine])


def declare_size(data: bytes, name: str, size: int) -> bytes:
    """``data`` with the central directory's uncompressed size of entry ``name`` set to ``size``."""
    end = data.rindex(b"PK\x05\x06")
    (at,) = struct.unpack("<I", data[end + 16 : end + 20])  # the central directory's offset
    while data[at + 46 : at + 46 + len(name)] != name.encode() or data[at + 46 + len(name) - 1] == 0:
        lengths = struct.unpack("<HHH", data[at + 28 : at + 34])
        at += 46 + sum(lengths)
    return data[: at + 24] + struct.pack("<I", size) + data[at + 28 :]


def with_graph(genuine: list, edit) -> bytes:
    """The genuine .pt2 with its program (``models/model.json``) passed through ``edit(program)``."""
    name = next(n for n, _ in genuine if n.endswith("models/model.json"))
    program = json.loads(dict(genuine)[name])
    edit(program)
    return replaced(genuine, name, json.dumps(program).encode())


def pt2_cases(genuine: list, marker):
    """(label, archive bytes) of tampered copies of a genuine .pt2: payloads where torch would unpickle or evaluate,
    operators and nodes the genuine program has not (``from_file``, in-place writes, any other), reordered
    programs, and archives malformed or declaring gigabytes; and three reshaped genuine archives."""
    names, content = [n for n, _ in genuine], dict(genuine)
    top, program = names[0].partition("/")[0], next(n for n in names if n.endswith("models/model.json"))
    weights = [n for n in names if "/weight_" in n]
    payload = pickle.dumps(Payload(marker))
    for name in [n for n in names if "/weight_" not in n] + weights[:2]:
        rel, index = name.partition("/")[2], names.index(name)
        for where, position in (("first", 0), ("after", index + 1), ("last", len(names))):
            yield f"duplicate {rel} {where}", archive(genuine[:position] + [(name, payload)] + genuine[position:])
        yield f"case-variant duplicate {rel}", archive(genuine[:index] + [(name.upper(), payload)] + genuine[index:])
        yield f"pickle under {rel}", replaced(genuine, name, payload)
    for trick in ("../{rel}", "/{top}/{rel}", "{top}/../{rel}", "{top}\\{rel}", "{top}/data/../{rel}",
                  "{top}//{rel}", "{top}/./{rel}", "{top}/{rel}/", "other/{rel}", "{top}/extra/script.py"):  # fmt: skip
        name = trick.format(top=top, rel="data/weights/weight_0")
        yield f"entry {trick}", archive(genuine + [(name, payload)])
    config = next(n for n in names if n.endswith("weights_config.json"))
    flagged = json.loads(content[config])
    next(iter(flagged["config"].values()))["use_pickle"] = True
    yield "use_pickle", replaced(genuine, config, json.dumps(flagged).encode())
    constants = next(n for n in names if n.endswith("constants_config.json"))
    meta = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
    tampered = replaced(genuine, constants, json.dumps({"config": {"c": meta}}).encode())
    yield "custom object", archive(entries_of(tampered) + [(f"{top}/data/constants/custom_obj_0", payload)])
    yield "sample inputs pickle", replaced(genuine, next(n for n in names if "sample_inputs" in n), payload)

    def node(target, inputs):
        return {"target": target, "inputs": inputs, "outputs": [{"as_tensor": {"name": "evil"}}], "metadata": {}}

    path_arg = {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1}
    from_file = node(
        "torch.ops.aten.from_file.default", [path_arg, {"name": "shared", "arg": {"as_bool": True}, "kind": 1}]
    )
    fill = node("torch.ops.aten.fill_.Scalar", [{"name": "self", "arg": {"as_tensor": {"name": "evil"}}, "kind": 1}])
    save = node("torch.ops.aten._save_jit_module.default", [path_arg])
    graph = lambda p: p["graph_module"]["graph"]  # noqa: E731
    yield "from_file node", with_graph(genuine, lambda p: graph(p)["nodes"].insert(0, from_file))
    yield "from_file and fill_ nodes", with_graph(
        genuine, lambda p: graph(p).update(nodes=[from_file, fill, *graph(p)["nodes"]])
    )
    yield "save-like node", with_graph(genuine, lambda p: graph(p)["nodes"].append(save))
    yield "a node twice", with_graph(genuine, lambda p: graph(p)["nodes"].insert(1, graph(p)["nodes"][0]))
    yield "nodes reordered", with_graph(genuine, lambda p: graph(p)["nodes"].reverse())
    yield "a node dropped", with_graph(genuine, lambda p: graph(p)["nodes"].pop(3))
    for i, target in enumerate(
        ["builtins.open", "os.system", "torch.ops.aten.sigmoid.default", "torch.ops.higher_order.cond"]
    ):
        yield f"target {target}", with_graph(genuine, lambda p, t=target: graph(p)["nodes"][i].update(target=t))
    yield "an argument changed", with_graph(
        genuine, lambda p: graph(p)["nodes"][0]["inputs"][3]["arg"].update(as_ints=[1, 1])
    )
    yield "guards_code", with_graph(genuine, lambda p: p.update(guards_code=[f"open({str(marker)!r}, 'w')"]))
    yield "shape expression", replaced(
        genuine, program, content[program].replace(b"Symbol(", f"open({str(marker)!r}, 'w') and Symbol(".encode(), 1)
    )
    yield "range widened", with_graph(
        genuine, lambda p: next(iter(p["range_constraints"].values())).update(max_val=10**12)
    )
    whole = archive(genuine)
    for i in range(1, 8):
        yield f"truncated to {i}/8", whole[: len(whole) * i // 8]
    yield "empty file", b""
    yield "not a zip", b"PK\x03\x04" + b"\x00" * 100
    for name in (weights[0], program):
        yield f"{name} declaring 3.7 GB", declare_size(whole, name, 0xF000_0000)
    yield "9,000 entries", archive(genuine + [(f"{top}/extra/x{i}", b"") for i in range(9000)])
    yield "weights file one byte short", archive([(n, d[:-1] if n == weights[0] else d) for n, d in genuine])
    yield "calibration that is not JSON", archive(genuine + [(f"{top}/extra/calibration.json", payload)])
    # the genuine archive reshaped: it must still load, with the genuine weights
    yield "entries deflated (a program's JSON could inflate to 1 GiB)", archive(genuine, zipfile.ZIP_DEFLATED)
    padded = dict(genuine)[program] + b" " * (5 * len(dict(genuine)[program]) + (1 << 20))  # the same JSON, padded
    yield "its program padded to 6x its size", archive([(n, padded if n == program else d) for n, d in genuine])
    yield "genuine: entries in reverse order", archive(genuine[::-1])
    yield "genuine: another top folder name", archive([("renamed/" + n.partition("/")[2], d) for n, d in genuine])


class Trap(torch.nn.Module):
    """A layer whose ``__setstate__``, which ``torch.jit.load`` runs, maps the file at ``path`` (creating it)."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.mapped = path, torch.zeros(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self):
        return (self.training, self.path)

    @torch.jit.export
    def __setstate__(self, state: tuple[bool, str]):
        self.training, self.path = state
        self.mapped = torch.from_file(self.path, shared=True, size=1)


class Writes(torch.nn.Module):
    """The network behind a :class:`Trap`: TorchScript of it looks like the network's, and writes a file."""

    def __init__(self, network, path: str):
        super().__init__()
        self.trap, self.net = Trap(path), network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.trap(x))


def ts_cases(genuine: list, marker, evil_ts: bytes):
    """Tampered TorchScript: a module with a ``__setstate__`` that writes a file (a whole other program), code
    calling another operator, an extra method, pickles, and malformed or padded archives; extra files kept."""
    names, content = [n for n, _ in genuine], dict(genuine)
    code = next(n for n in names if n.startswith(names[0].partition("/")[0] + "/code/") and b"torch.cat(" in content[n])
    yield "a module whose __setstate__ writes a file", evil_ts
    yield "code calling another operator", replaced(
        genuine, code, content[code].replace(b"torch.cat(", b"torch.stack(", 1)
    )
    method = (
        b"\n  def __setstate__(self: __torch__.monai.networks.nets.densenet._DenseLayer,\n"
        b"    state: Tuple[bool]) -> NoneType:\n    self.training = state[0]\n"
        b'    _0 = torch.from_file("' + str(marker).encode() + b'", True, 1)\n    return None\n'
    )
    yield "an extra __setstate__ method", replaced(genuine, code, content[code] + method)
    yield "an extra code file", archive(
        genuine + [(code.replace("densenet.py", "evil.py"), b"def f(x: int) -> int:\n  return x\n")]
    )
    for name in [n for n in names if n.endswith(("data.pkl", "constants.pkl", ".debug_pkl"))][:4]:
        yield f"pickle under {name}", replaced(genuine, name, pickle.dumps(Payload(marker)))
    storage = next(n for n in names if n.rsplit("/", 1)[-1].isdigit())
    yield "a storage one byte short", archive([(n, d[:-1] if n == storage else d) for n, d in genuine])
    yield "a storage declaring 3.7 GB", declare_size(archive(genuine), storage, 0xF000_0000)
    yield "truncated", archive(genuine)[:5000]
    yield "genuine: extra files added", archive(genuine + [(f"{names[0].partition('/')[0]}/extra/notes.txt", b"hello")])
    yield "genuine: entries in reverse order", archive(genuine[::-1])


def onnx_cases(model, secret):
    """Tampered ONNX models (``onnx.ModelProto`` edited): initializers read from another file (in the graph, in a
    subgraph), subgraphs, functions, sparse initializers, extra nodes and properties; one genuine copy."""
    import onnx
    from onnx import helper, numpy_helper

    def copy():
        m = onnx.ModelProto()
        m.CopyFrom(model)
        return m

    m = copy()
    tensor = next(t for t in m.graph.initializer if t.name == "class_layers.out.bias")  # read from ``secret``
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=secret.name)  # a file beside the model
    yield "external data", m
    m = copy()
    inner = numpy_helper.from_array(numpy_helper.to_array(model.graph.initializer[0]), "inner")
    inner.ClearField("raw_data")
    inner.data_location = onnx.TensorProto.EXTERNAL
    inner.external_data.add(key="location", value=secret.name)
    branch = helper.make_graph(
        [helper.make_node("Identity", ["inner"], ["out"])],
        "b",
        [],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)],
        [inner],
    )
    flag = helper.make_tensor("flag", onnx.TensorProto.BOOL, [], [True])
    m.graph.initializer.append(flag)
    m.graph.node.append(helper.make_node("If", ["flag"], ["if_out"], then_branch=branch, else_branch=branch))
    yield "external data in a subgraph", m
    m = copy()
    m.functions.append(
        helper.make_function(
            "evil", "f", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])], [helper.make_opsetid("", 18)]
        )
    )
    yield "a function", m
    m = copy()
    m.graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            numpy_helper.from_array(torch.ones(2).numpy(), "v"),
            numpy_helper.from_array(torch.tensor([0, 1]).numpy(), "i"),
            [4],
        )
    )
    yield "a sparse initializer", m
    m = copy()
    m.graph.node.insert(0, helper.make_node("Identity", ["image"], ["copy"]))
    yield "an extra node", m
    m = copy()
    m.graph.node[0].op_type = "Sigmoid"
    yield "another operator", m
    m = copy()
    helper.set_model_props(m, {"evil": "x"})
    yield "another property", m
    m = copy()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]
    yield "an initializer short of its size", m
    m = copy()
    m.graph.doc_string = "changed documentation"
    yield "genuine: documentation changed", m
    m = copy()
    m.graph.doc_string = "x" * (3 << 20)  # parsing costs ~80x the bytes: a bomb is refused by its size first
    yield "3 MiB of documentation", m


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Exports of a small DenseNet written by the bundle's writers (.pt2 and .onnx carrying a calibration, .ts as
    MONAI's ckpt_export scripts it) and its state dict: their folder."""
    from monai.data import save_net_with_metadata

    from scripts.programs import write_onnx, write_pt2

    folder = tmp_path_factory.mktemp("small")
    network = small_network()
    write_pt2(network, str(folder / "model.pt2"), (64, 64), json.dumps({"temperature": 1.5}))
    write_onnx(network, str(folder / "model.onnx"), (64, 64), json.dumps({"temperature": 1.5}))
    save_net_with_metadata(torch.jit.script(network), str(folder / "model.ts"), meta_values={"x": 1})
    torch.save(network.state_dict(), folder / "model.pt")
    return folder


def load(path, network=None):
    from scripts.model_file import ModelDescription, load_model

    return load_model(str(path), network=network or small_network(), description=ModelDescription(tuple("abcdef")))


def run_cases(cases, path, marker, expected_logits, suffix: str) -> Counter:
    """Each case written to ``path`` and loaded by the bundle's loader: refused in one line naming the file, or
    the genuine weights; no marker; under 5 s each. Returns the outcomes."""
    from scripts.errors import BundleError

    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    outcomes = Counter()
    for label, data in cases:
        path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
        try:
            network = load(path)
        except BundleError as e:
            assert "\n" not in e.problem and str(path) in e.problem, (label, e.problem)
            assert not label.startswith("genuine"), (label, e.problem)
            outcomes["refused"] += 1
        else:
            assert label.startswith("genuine"), label
            with torch.no_grad():
                torch.testing.assert_close(network(images), expected_logits, msg=label)
            outcomes["genuine"] += 1
        assert not marker.exists(), (label, suffix)
    return outcomes


def test_fuzzed_pt2_archives_are_refused_in_one_line_or_load_the_genuine_weights(small, tmp_path):
    marker = tmp_path / "payload-ran"
    with torch.no_grad():
        expected = small_network()(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    genuine = entries_of((small / "model.pt2").read_bytes())
    outcomes = run_cases(pt2_cases(genuine, marker), tmp_path / "model.pt2", marker, expected, "pt2")
    assert outcomes["refused"] >= 62 and outcomes["genuine"] == 2, outcomes


def test_fuzzed_torchscript_is_refused_in_one_line_or_loads_the_genuine_weights(small, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ts"
    torch.jit.save(torch.jit.script(Writes(small_network(), str(marker))), str(evil))
    with torch.no_grad():
        expected = small_network()(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    genuine = entries_of((small / "model.ts").read_bytes())
    outcomes = run_cases(ts_cases(genuine, marker, evil.read_bytes()), tmp_path / "model.ts", marker, expected, "ts")
    assert outcomes["refused"] >= 9 and outcomes["genuine"] == 2, outcomes
    # the control: TorchScript's own loader runs the module's __setstate__, which creates the file
    subprocess.run(
        [sys.executable, "-c", f"import torch; torch.jit.load({str(evil)!r})"], capture_output=True, timeout=120
    )
    assert marker.exists()


def test_fuzzed_onnx_models_are_refused_in_one_line_or_load_the_genuine_weights(small, tmp_path):
    import numpy as np
    import onnx
    import onnxruntime

    marker, secret = tmp_path / "payload-ran", tmp_path / "secret.bin"
    model = onnx.load(str(small / "model.onnx"))
    size = len(next(t for t in model.graph.initializer if t.name == "class_layers.out.bias").raw_data)
    secret.write_bytes(np.full(size // 4, 1000.0, np.float32).tobytes())  # what an external-data model reads
    with torch.no_grad():
        expected = small_network()(torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    outcomes = run_cases(onnx_cases(model, secret), tmp_path / "model.onnx", marker, expected, "onnx")
    assert outcomes["refused"] >= 9 and outcomes["genuine"] == 1, outcomes
    # the control: ONNX Runtime, given the file's path, reads the other file the model names
    external = next(onnx_cases(model, secret))[1]
    onnx.save(external, str(tmp_path / "external.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "external.onnx"), providers=["CPUExecutionProvider"])
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)).numpy()
    assert float(np.abs(session.run(None, {"image": images})[0] - expected.numpy()).max()) > 100


def test_plain_torch_export_load_runs_the_attacks_that_the_loader_refuses(small, tmp_path):
    """The control for .pt2: torch's own loader runs the payloads of shape expressions and sample inputs (so the
    fuzz would catch a loader that let them through), which the bundle's loader refuses."""
    genuine = entries_of((small / "model.pt2").read_bytes())
    markers = {}
    for kind in ("shape expression", "sample inputs pickle"):
        folder = tmp_path / kind.replace(" ", "_")
        folder.mkdir()
        markers[kind] = folder / "payload-ran"
        data = next(d for label, d in pt2_cases(genuine, markers[kind]) if label == kind)
        (folder / "model.pt2").write_bytes(data)
        with bundle_error(str(folder / "model.pt2")):
            load(folder / "model.pt2")
        assert not markers[kind].exists()
    code = "import sys, torch\nfor p in sys.argv[1:]:\n    try:\n        torch.export.load(p)\n    except Exception:\n        pass"
    paths = [str(m.parent / "model.pt2") for m in markers.values()]
    subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, timeout=300)
    assert all(m.exists() for m in markers.values()), {k: m.exists() for k, m in markers.items()}


def test_model_pt_archives_are_refused_before_torch_reads_them(small, tmp_path):
    """A model.pt must be torch.save's layout, stored (as torch writes it), declaring no more than its network's
    weights need: a deflated storage (64 MiB of zeros in 64 KiB, or declaring 3.7 GB), a pickle, a foreign entry
    are each refused in one line before torch reads it."""

    marker = tmp_path / "payload-ran"
    genuine = entries_of((small / "model.pt").read_bytes())
    old = io.BytesIO()
    torch.save({"other": torch.zeros(3)}, old, _use_new_zipfile_serialization=False)
    old_format = old.getvalue()
    storage = next(n for n, _ in genuine if n.rsplit("/", 1)[-1].isdigit())
    pkl = next(n for n, _ in genuine if n.endswith("data.pkl"))
    cases = {
        "a deflated 64 MiB storage": archive(
            [(n, bytes(64 << 20) if n == storage else d) for n, d in genuine], zipfile.ZIP_DEFLATED
        ),
        "a storage declaring 3.7 GB": declare_size(archive(genuine), storage, 0xF000_0000),
        "a pickle": archive([(n, pickle.dumps(Payload(marker)) if n == pkl else d) for n, d in genuine]),
        "a foreign entry": archive(genuine + [(f"{genuine[0][0].partition('/')[0]}/extra/run.py", b"print(1)")]),
        "an old torch.save before the archive": old_format + archive(genuine),
        "a dict key of tuples nested 63 deep": archive([(n, nested_key(63) if n == pkl else d) for n, d in genuine]),
    }
    for label, data in cases.items():
        path = tmp_path / "model.pt"
        path.write_bytes(data)
        with bundle_error(str(path)) as found:
            load(path)
        assert "\n" not in found[0].problem and not marker.exists(), label
    assert len(cases["a deflated 64 MiB storage"]) < 1 << 20
    # the controls: torch.load reads the old-format prefix instead of the archive, and hangs on the nested key
    (tmp_path / "prefixed.pt").write_bytes(cases["an old torch.save before the archive"])
    assert list(torch.load(tmp_path / "prefixed.pt", weights_only=True)) == ["other"]
    (tmp_path / "nested.pt").write_bytes(cases["a dict key of tuples nested 63 deep"])
    code = f"import torch; print('loading', flush=True); torch.load({str(tmp_path / 'nested.pt')!r}, weights_only=True)"
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=6)
    assert b"loading" in hung.value.stdout  # torch imported, then torch.load never returned


def nested_key(depth: int) -> bytes:
    """A protocol-2 pickle of a dict whose keys are tuples t = (t', t'), nested up to ``depth`` deep, each half the
    memo's same tuple (``depth`` odd: the tuples pair up as keys and values): a few hundred bytes whose last key
    costs 2**(depth - 1) to hash."""
    ops = b"\x80\x02}(K\x01\x85q\x00"  # PROTO 2, EMPTY_DICT, MARK, (1,) memoized as 0
    for k in range(1, depth + 1):
        ops += b"h" + bytes([k - 1]) + b"h" + bytes([k - 1]) + b"\x86q" + bytes([k])  # (t, t) memoized as k
    return ops + b"u."  # SETITEMS (key, value pairs since the mark), STOP


def test_tampered_checkpoint_in_inference_is_refused_before_any_file(trained, mednist, tmp_path):
    flag = tmp_path / "payload-ran"
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(pickle.dumps(Payload(flag)))
    with bundle_error("cannot be read"):
        infer(tmp_path, tmp_path / "out", mednist)  # ckpt_dir tmp_path/models
    assert not flag.exists() and not (tmp_path / "out").exists()


def test_bundle_exports_load_through_the_check_and_an_old_torch_export_is_refused(exported, tmp_path):
    """The bundle's own DenseNet121 exports (.pt2, MONAI ckpt_export's .ts, .onnx) pass the check; a .pt2 whose
    program another torch wrote is refused with the fix to export it again."""
    from scripts.model_file import load_model

    for name in ("model.pt2", "model.ts", "model.onnx"):
        load_model(str(exported / name))
    genuine = entries_of((exported / "model.pt2").read_bytes())

    def older(program):
        program["torch_version"] = "2.9.0"
        program["schema_version"] = {"major": 8, "minor": 1}

    (tmp_path / "model.pt2").write_bytes(with_graph(genuine, older))
    with bundle_error("written by torch 2.9.0") as found:
        load_model(str(tmp_path / "model.pt2"))
    assert "export it again from its model.pt" in found[0].fix
