"""The CPU precision decision: the processor's flags where they settle it, else a probe of pairs that must agree,
else fp32; and the environment variables that limit PyTorch's and oneDNN's kernels."""

import json
import os
import subprocess
import sys

import pytest

from conftest import BUNDLE as BUNDLE_ROOT
from scripts.precision import CpuPrecision, Processor, decide, probe_decision, timed_ratios

AVX512 = "avx2 avx512f avx512bw avx512vl"


def native(flags, capability="AVX512", isa=""):
    return Processor(frozenset(flags.split()) if flags is not None else None, capability, isa).native_bf16()


@pytest.mark.parametrize(
    "flags, capability, isa, expected, reason",
    [
        (f"{AVX512} avx512_bf16 amx_bf16 amx_tile", "AVX512", "", True, "AMX and AVX-512 BF16 in the CPU flags"),
        (f"{AVX512} avx512_bf16", "AVX512", "", True, "AVX-512 BF16 (no AMX)"),
        (f"{AVX512} avx512_bf16 amx_bf16", "AVX512", "AVX512_CORE_BF16", True, "AMX off: ONEDNN_MAX_CPU_ISA"),
        (f"{AVX512} avx512_bf16", "AVX512", "ALL", True, "oneDNN and ATen at AVX512"),
        ("avx avx2 fma", "AVX2", "", False, "no AVX-512 BF16 or AMX in the CPU flags (AVX2)"),
        (AVX512, "AVX512", "", False, "bf16 would be emulated"),
        (f"{AVX512} avx512_bf16 amx_bf16", "AVX2", "AVX2", False, "ONEDNN_MAX_CPU_ISA=AVX2 limits oneDNN"),
        (f"{AVX512} avx512_bf16", "AVX512", "AVX512_CORE", False, "limits oneDNN below it"),
        (f"{AVX512} avx512_bf16", "AVX2", "", None, "ATen's kernels run at AVX2"),
        (f"{AVX512} avx512_bf16", "AVX512", "AVX9000", None, "not an ISA name known here"),
        ("avx2 avx_vnni avx_ne_convert", "AVX2", "", None, "AVX-NE-CONVERT without AVX-512 BF16"),
        (None, "DEFAULT", "", None, "no x86 CPU flags to read"),
    ],
)
def test_the_processor_decides_where_its_flags_and_limits_settle_it(flags, capability, isa, expected, reason):
    chosen, why = native(flags, capability, isa)
    assert chosen is expected and reason in why


def test_flags_that_settle_it_decide_without_a_probe():
    def no_probe():
        raise AssertionError("probed although the flags settle it")

    assert decide(Processor(frozenset({"avx512_bf16"}), "AVX512"), no_probe) == (
        True,
        "decided by the processor: AVX-512 BF16 (no AMX) in the CPU flags, oneDNN and ATen at AVX512",
    )
    assert decide(Processor(frozenset({"avx2"}), "AVX2"), no_probe)[0] is False


@pytest.mark.parametrize(
    "ratios, expected, pairs_read",
    [
        ([1.9, 2.0, 2.1, 1.8, 9.9], True, 4),  # four agreeing pairs: bf16
        ([0.5, 2.0, 2.1, 1.9], True, 4),  # one disturbed pair among four does not decide against them
        ([0.5, 0.4, 2.0, 2.1, 1.9, 2.2], True, 5),  # two disturbed in four do: read on until only one is
        ([0.1, 0.12, 0.11, 0.09], False, 4),  # emulated: several times slower
        ([1.2, 1.2, 1.2, 1.2, 1.2], None, 5),  # 1.2 is above 1.15 but not by the margin: no decision
        ([0.5, 2.0] * 6, None, 12),  # a busy machine's coin toss: never agreeing, the fallback
        ([], None, 0),
    ],
)
def test_the_probe_reads_pairs_until_they_agree_with_a_margin(ratios, expected, pairs_read):
    read = []
    chosen, why = probe_decision(r for r in ratios if not read.append(r))
    assert chosen is expected and len(read) == pairs_read
    assert ("agree:" in why) if expected is not None else ("did not agree" in why or why == "no timed step")


def test_without_flags_the_probe_decides_and_without_agreement_fp32():
    unknown = Processor(None, "DEFAULT")
    chosen, why = decide(unknown, lambda: iter([2.0, 2.0, 2.0, 2.0]))
    assert chosen and why.startswith("decided by a probe, as no x86 CPU flags to read") and "2.00x" in why
    chosen, why = decide(unknown, lambda: iter([0.5, 2.0] * 6))
    assert not chosen and why.startswith("fp32 by default") and "12 pairs of timed steps did not agree" in why


def test_the_real_probe_keeps_to_its_budget():
    ratios = list(timed_ratios(seconds=0.0))
    assert len(ratios) == 1 and ratios[0] > 0
    assert 1 <= len(list(timed_ratios(seconds=10.0, pairs=3))) <= 3


def test_a_setting_overrides_and_cuda_never_autocasts_on_the_cpu(caplog):
    with caplog.at_level("INFO", logger="scripts.precision"):
        assert CpuPrecision(False).decide() is False and CpuPrecision(True).decide() is True
        assert CpuPrecision("auto", device="cuda").decide() is False
    assert "CPU precision: fp32 (--cpu_bf16 false)" in caplog.text


@pytest.mark.parametrize(
    "env, capability",
    [({"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, "AVX2"), ({"DNNL_MAX_CPU_ISA": "avx2"}, None)],
)
def test_the_environment_that_limits_kernels_is_respected(env, capability):
    """Read in a fresh process, as a user's run sets it: emulated bf16 is never chosen there."""
    code = (
        "import json; from scripts.precision import Processor, decide, timed_ratios; p = Processor.here();"
        "print(json.dumps([p.capability, p.onednn_isa, p.flags is not None, decide(p, timed_ratios)]))"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=BUNDLE_ROOT, env={**clean, **env}, capture_output=True, text=True
    )
    found, isa, has_flags, (chosen, why) = json.loads(proc.stdout)
    assert isa == "AVX2" and (capability is None or found == capability), proc.stderr
    if has_flags:  # x86 Linux: the limit decides, without a probe
        assert chosen is False and ("limits oneDNN below it" in why or "no AVX-512 BF16 or AMX" in why), why
