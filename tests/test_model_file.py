"""Model files never run code (scripts.model_file): a deterministic fuzz of tampered .pt2 archives, each refused in
one line or loading the genuine weights, no payload run, none slow; the control shows torch's own loader running
them; tampered TorchScript and checkpoints; shape expressions."""

from __future__ import annotations

import io
import json
import pickle
import re
import struct
import subprocess
import sys
import time
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


def replaced(genuine: list, name: str, data: bytes) -> bytes:
    """The genuine archive with the bytes of entry ``name`` replaced by ``data``."""
    return archive([(n, data if n == name else d) for n, d in genuine])


def declare_size(data: bytes, name: str, size: int) -> bytes:
    """``data`` with the central directory's uncompressed size of entry ``name`` set to ``size``."""
    end = data.rindex(b"PK\x05\x06")
    (at,) = struct.unpack("<I", data[end + 16 : end + 20])  # the central directory's offset
    while data[at + 46 : at + 46 + len(name)] != name.encode() or data[at + 46 + len(name) - 1] == 0:
        lengths = struct.unpack("<HHH", data[at + 28 : at + 34])
        at += 46 + sum(lengths)
    return data[: at + 24] + struct.pack("<I", size) + data[at + 28 :]


def evil(rel: str, content: bytes, marker) -> bytes:
    """A version of the entry ``rel`` that would run a payload creating ``marker`` if torch loaded it."""
    if rel.endswith("weights_config.json"):
        config = json.loads(content)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()
    if rel.startswith("models/"):
        return content.replace(b"Symbol(", f"open({str(marker)!r}, 'w') and Symbol(".encode(), 1)
    return pickle.dumps(Payload(marker))


ATTACKS = ("duplicate config first", "duplicate config after", "shape expression", "sample inputs")


def attack(genuine: list, marker, kind: str) -> bytes:
    """An archive that plain ``torch.export.load`` may let run a payload creating ``marker``: a duplicate weights
    config marking a pickled weight, first in the archive or right after the genuine one (zipfile reads the last
    of two names; torch's reader, a binary search, picks one by the archive's layout), a shape expression
    calling a function, or sample inputs that need unrestricted unpickling."""
    payload = pickle.dumps(Payload(marker))
    if kind.startswith("duplicate config"):
        config = next(i for i, (n, _) in enumerate(genuine) if n.endswith("weights_config.json"))
        tampered = [(n, payload if n.endswith("/weight_0") else d) for n, d in genuine]
        duplicate = (genuine[config][0], evil("weights_config.json", genuine[config][1], marker))
        at = 0 if kind.endswith("first") else config + 1
        return archive(tampered[:at] + [duplicate] + tampered[at:])
    if kind == "shape expression":
        return archive([(n, evil("models/", d, marker) if "/models/" in n else d) for n, d in genuine])
    return archive([(n, payload if "sample_inputs" in n else d) for n, d in genuine])


def fuzz_cases(genuine: list, marker):
    """(label, archive bytes) of at least 200 tampered copies of the genuine export's ``(name, bytes)`` entries."""
    names = [n for n, _ in genuine]
    top = names[0].partition("/")[0]
    weights = [n for n in names if "/weight_" in n]
    notable = [n for n in names if "/weight_" not in n] + weights[:2] + weights[-1:]
    content = dict(genuine)
    yield from ((kind, attack(genuine, marker, kind)) for kind in ATTACKS)
    for name in notable:  # a duplicate of each entry at each position, and under a name differing in case
        rel, index = name.partition("/")[2], names.index(name)
        copy = (name, evil(rel, content[name], marker))
        for where, position in (("first", 0), ("before", index), ("after", index + 1), ("last", len(names))):
            yield f"duplicate {rel} {where}", archive(genuine[:position] + [copy] + genuine[position:])
        yield f"case-variant duplicate {rel}", archive(genuine[:index] + [(name.upper(), copy[1])] + genuine[index:])
        renamed = [(n.replace(rel, rel.upper()) if n == name else n, d) for n, d in genuine]
        yield f"renamed {rel} in upper case", archive(renamed)
    for name in [n for n in names if "/weight_" not in n] + weights[:: max(1, len(weights) // 60)]:  # every kind
        rel = name.partition("/")[2]
        yield f"pickle under {rel}", replaced(genuine, name, pickle.dumps(Payload(marker)))
    for name in names[:1] + [n for n in names if "/models/" in n or "/archive_format" in n]:  # extra top folders
        yield f"second top folder for {name}", archive(genuine + [("other/" + name.partition("/")[2], content[name])])
    for trick in ("../{rel}", "/{top}/{rel}", "{top}/../{rel}", "{top}\\{rel}", "{top}/data/../{rel}",
                  "{top}/extra/..", "{top}//{rel}", "{top}/./{rel}", "{top}/{rel}/"):  # fmt: skip
        rel = "data/weights/weight_0"
        yield f"path {trick}", archive(genuine + [(trick.format(top=top, rel=rel), pickle.dumps(Payload(marker)))])
    config_name = next(n for n in names if n.endswith("weights_config.json"))
    config = json.loads(content[config_name])
    for key in list(config["config"])[:: max(1, len(config["config"]) // 4)]:  # use_pickle flags
        flagged = json.loads(content[config_name])
        flagged["config"][key]["use_pickle"] = True
        yield f"use_pickle on {key}", replaced(genuine, config_name, json.dumps(flagged).encode())
    constants = next(n for n in names if n.endswith("constants_config.json"))
    for prefix in ("custom_obj_0", "opaque_obj_0", "tensor_0"):  # custom objects, opaque pickles, a pickled tensor
        meta = {"path_name": prefix, "is_param": False, "use_pickle": True, "tensor_meta": None}
        entries = [(n, json.dumps({"config": {"c": meta}}).encode() if n == constants else d) for n, d in genuine]
        payload = (f"{top}/data/constants/{prefix}", pickle.dumps(Payload(marker)))
        yield f"constant {prefix}", archive(entries + [payload])
    program = next(n for n in names if "/models/" in n)
    symbol = re.search(rb"Symbol\('s\d+', positive=True, integer=True\)", content[program]).group()
    expressions = [
        b"Symbol('s77', positive=True, integer=True) # comment",
        b"10**10**10*Symbol('s77', positive=True, integer=True)",
        b"Pow(10, 10**10)*Symbol('s77', positive=True, integer=True)",
        b"Mul(Integer(" + b"9" * 400 + b"), Symbol('s77', positive=True, integer=True))",
        b"Lambda(Symbol('s77'), 1)",
        b"__import__('os').system('true')",
        b"Symbol('s77', positive=True, integer=True).func",
        b"Symbol('s77', positive=True, integer=True)[0]",
        b"Symbol('s77'); Symbol('s1')",
        b'Symbol(\\"s77\\")',
        b"Function('f')(Symbol('s77'))",
        b"(Symbol('s77')**8)**8",
    ]
    for expression in expressions:
        yield f"expression {expression[:40]!r}", replaced(
            genuine, program, content[program].replace(symbol, expression)
        )
    for key, value in (("guards_code", [f"open({str(marker)!r}, 'w')"]), ("custom_obj_values", {"x": {}})):
        changed = json.loads(content[program])
        (changed if key == "guards_code" else changed["graph_module"]["graph"])[key] = value
        yield f"{key}", replaced(genuine, program, json.dumps(changed).encode())
    first = json.loads(content[program])["graph_module"]["graph"]["nodes"][0]["target"].encode()
    for target in ("builtins.open", "_operator.methodcaller", "torch.ops.higher_order.cond", "os.system"):
        yield f"target {target}", replaced(genuine, program, content[program].replace(first, target.encode(), 1))
    whole = archive(genuine)
    for i in range(1, 11):  # truncated archives
        yield f"truncated to {i}/11", whole[: len(whole) * i // 11]
    yield "empty file", b""
    yield "not a zip", b"PK\x03\x04" + b"\x00" * 100
    for name in (weights[0], program, names[0]):  # entries declaring gigabytes
        yield f"{name} declaring 3.7 GB", declare_size(whole, name, 0xF000_0000)
    yield "5,000 entries", archive(genuine + [(f"{top}/extra/x{i}", b"") for i in range(5000)])
    yield "weights file one byte short", archive([(n, d[:-1] if n == weights[0] else d) for n, d in genuine])
    # the genuine archive reshaped: it must still load, with the genuine weights
    yield "entries in reverse order", archive(genuine[::-1])
    yield "entries deflated", archive(genuine, zipfile.ZIP_DEFLATED)
    yield "another top folder name", archive([("renamed/" + n.partition("/")[2], d) for n, d in genuine])


def genuine_entries(path) -> list:
    with zipfile.ZipFile(path) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


@pytest.fixture(scope="module")
def small_pt2(tmp_path_factory):
    """An export written by the bundle's ``write_pt2`` (dynamic batch, calibration carried) of a MONAI DenseNet
    with few, narrow layers: the archive layout of the bundle's exports at a fraction of their 30 MB, so that each
    fuzz case is written and checked in milliseconds."""
    from monai.networks.nets import DenseNet

    from scripts.export import write_pt2

    torch.manual_seed(0)
    network = DenseNet(2, 1, 6, init_features=8, growth_rate=4, block_config=(2, 2, 2, 2), bn_size=2).eval()
    path = tmp_path_factory.mktemp("small") / "model.pt2"
    write_pt2(network, str(path), json.dumps({"temperature": 1.5}))
    return path


def test_fuzzed_pt2_archives_are_refused_in_one_line_or_load_the_genuine_weights(small_pt2, tmp_path):
    from scripts.model_file import load_model
    from scripts.utils import BundleError

    marker = tmp_path / "payload-ran"
    images = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_model(small_pt2)(images)
    path = tmp_path / "model.pt2"
    outcomes, refusals = Counter(), Counter()
    for label, data in fuzz_cases(genuine_entries(small_pt2), marker):
        path.write_bytes(data)
        start = time.monotonic()
        try:
            network = load_model(str(path))
        except BundleError as e:
            assert "\n" not in e.problem and str(path) in e.problem, (label, e.problem)
            outcomes["refused"] += 1
            refusals[e.problem.split(":")[0].split(" (")[0]] += 1
        else:
            with torch.no_grad():
                torch.testing.assert_close(network(images), expected, msg=label)
            outcomes["genuine"] += 1
        assert time.monotonic() - start < 5, label
        assert not marker.exists(), label
    assert outcomes["refused"] >= 200 and outcomes["genuine"] == 3, (outcomes, refusals)


def test_plain_torch_export_load_runs_the_attacks_that_the_loader_refuses(exported, trained, mednist, tmp_path):
    """The control: torch's own loader runs each attack's payload (so the fuzz would catch a loader that let
    them through); the bundle's inference command refuses each before writing anything."""
    markers, genuine = {}, genuine_entries(exported / "model.pt2")
    for i, kind in enumerate(ATTACKS):
        folder = tmp_path / str(i)
        folder.mkdir()
        markers[kind] = folder / "payload-ran"
        (folder / "model.pt2").write_bytes(attack(genuine, markers[kind], kind))
        with bundle_error(f"refused to load {folder / 'model.pt2'}") as found:
            infer(trained, folder / "out", mednist, model_file=folder / "model.pt2")
        assert "from a source you trust" in found[0].fix
        assert not markers[kind].exists() and not (folder / "out").exists()
    load = "import sys, torch\nfor p in sys.argv[1:]:\n    try:\n        torch.export.load(p)\n    except Exception:\n        pass"
    paths = [str(tmp_path / str(i) / "model.pt2") for i in range(len(markers))]
    subprocess.run([sys.executable, "-c", load, *paths], capture_output=True, timeout=300)
    ran = {kind: marker.exists() for kind, marker in markers.items()}
    assert ran["shape expression"] and ran["sample inputs"], ran
    assert ran["duplicate config first"] or ran["duplicate config after"], ran  # whichever torch's reader picks


def rewrite_zip(src, dst, edit) -> None:
    """Copy the zip archive ``src`` to ``dst`` with each entry's bytes passed through ``edit(name, data)``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))


def test_tampered_torchscript_and_checkpoint_are_refused(exported, trained, mednist, tmp_path):
    flag = tmp_path / "payload-ran"
    bad_ts = tmp_path / "model.ts"
    rewrite_zip(
        exported / "model.ts", bad_ts, lambda n, d: pickle.dumps(Payload(flag)) if n.endswith("data.pkl") else d
    )
    with bundle_error(f"cannot load model file {bad_ts}"):
        infer(trained, tmp_path / "out", mednist, model_file=bad_ts)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(pickle.dumps(Payload(flag)))
    with bundle_error("cannot be read"):
        infer(tmp_path, tmp_path / "out", mednist)  # ckpt_dir tmp_path/models
    assert not flag.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "text, ok",
    [
        ("Symbol('s77', positive=True, integer=True)", True),
        ("Add(Mul(Integer(2), Symbol('s0', integer=True)), Integer(-1))", True),
        ("FloorDiv(s0, 2) + s1 % 3 - 4 * s2 ** 2", True),
        ("Max(1, Min(s0, 4096))", True),
        ("10**10**10", False),
        ("s0**9", False),
        ("(s0 + 1)**2", False),
        ("s0 # comment", False),
        ("s0\n+ 1", False),
        ("s0.func", False),
        ("Pow(s0, 2)", False),
        ("Symbol('s0', positive=__import__)", False),
        ("1" * 20, False),
        ("Max(s0, 1", False),
        ("s0 s1", False),
        ("(" * 30 + "s0" + ")" * 30, False),
        ("s0 + " * 200 + "s0", False),
    ],
)
def test_shape_expressions_pass_a_strict_grammar(text, ok):
    from scripts.model_file import shape_expression_ok

    assert shape_expression_ok(text) is ok
