"""A failing argument check inside lpq's CUDA ops must raise RuntimeError, never end the process.

On the device, a TORCH_CHECK that failed inside an op killed Python (SIGSEGV, rc 139): the extensions
were linked against a static copy of the C++ runtime while libc10, which throws, runs on the shared
libstdc++. cuda_build now names the process's shared libstdc++ on the link line (``_link_flags``).

GPU tests (skip without CUDA): each of the three extensions is called directly (the Python wrappers,
which check first, are bypassed) with bad arguments in a subprocess, which must exit 0 having caught a
RuntimeError naming the problem, and must still run the op with valid arguments afterwards.
CPU tests: the link flags, the cache key, the arguments ``_build`` passes, and the mechanism itself on a
C++-only extension linked with ``-static-libstdc++`` (the state seen on the device) plus the fix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lpq.kernels import cuda_build, ptq161_cuda

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (CI has none); run on the device")
ROOT = Path(__file__).resolve().parents[1]
IS_LINUX = sys.platform.startswith("linux")

# Runs in a fresh interpreter: argv[1] names the extension. Every call prints one JSON line, so that a
# crash part-way still shows which calls came back. Shapes: n = 32 rows (2 tiles of 16), k = 128 (one
# chunk), bits = 4: the uniform/LUT code tensors hold 2 tiles x 1 chunk x 64 x 4 words.
CHILD = textwrap.dedent(r'''
    import json, sys, torch
    ext = sys.argv[1]
    dev, h = torch.device("cuda"), torch.float16

    def bad(case, fn):
        try:
            fn()
            out = {"case": case, "raised": None, "msg": ""}
        except Exception as e:  # RuntimeError expected; anything else is reported as it is
            out = {"case": case, "raised": type(e).__name__, "msg": str(e).splitlines()[0] if str(e) else ""}
        print(json.dumps(out), flush=True)

    def alive(y):
        torch.cuda.synchronize()
        print(json.dumps({"case": "valid call after the errors", "shape": list(y.shape),
                          "all_zero": bool((y == 0).all()), "finite": bool(torch.isfinite(y).all())}), flush=True)

    n, k, bits = 32, 128, 4
    x = torch.zeros(1, k, dtype=h, device=dev)
    if ext == "uniform":
        from lpq.kernels import cuda_build
        assert cuda_build.load(), cuda_build.failure_reason()
        op = torch.ops.lpq_cuda
        qw = torch.zeros(2, 1, 64 * bits, dtype=torch.int32, device=dev)
        sc = torch.zeros(1, 2, 8, dtype=torch.int32, device=dev)  # [groups, n tiles, 8] fp16 scale pairs
        zp = torch.zeros(1, 2, 8, dtype=torch.int16, device=dev)
        bad("gemm bits=5", lambda: op.uniform_gemm(x, qw, sc, zp, None, 5, 128, 128, n, k, 4, 0))
        bad("gemm x [1, 64]", lambda: op.uniform_gemm(x[:, :64].contiguous(), qw, sc, zp, None, bits, 128, 128, n, k, 4, 0))
        bad("gemm warps=9", lambda: op.uniform_gemm(x, qw, sc, zp, None, bits, 128, 128, n, k, 9, 0))
        bad("dequant fold=48", lambda: op.uniform_dequant(qw, sc, zp, bits, 48, 128, n, k, False))
        alive(op.uniform_dequant(qw, sc, zp, bits, 128, 128, n, k, False))  # zero scales -> zero weights
    elif ext == "lut":
        from lpq.kernels import cuda_build
        assert cuda_build.load_lut(), cuda_build.lut_failure_reason()
        op = torch.ops.lpq_lut
        qw = torch.zeros(2 * 1 * 64 * bits, dtype=torch.int32, device=dev)
        tab = torch.zeros(32, 8, dtype=torch.int32, device=dev)  # [n_pad, 2**bits / 2] fp16 centroid pairs
        bad("dequant bits=5", lambda: op.lut_dequant(qw, tab, 5, n, k, False))
        bad("gemm x [1, 64]", lambda: op.lut_gemm(x[:, :64].contiguous(), qw, tab, None, None, None, bits, n, k, 4))
        bad("gemm warps=9", lambda: op.lut_gemm(x, qw, tab, None, None, None, bits, n, k, 9))
        alive(op.lut_dequant(qw, tab, bits, n, k, False))  # zero centroids -> zero weights
    elif ext == "ptq161":
        from lpq.kernels import ptq161_cuda
        assert ptq161_cuda.load(), ptq161_cuda.EXTENSION.failure_reason()
        k = 64  # 32 salient (4-bit, 8 per word) + 32 binarized (1-bit, 32 per word) channels
        xp = torch.zeros(1, k, dtype=h, device=dev)
        qw = torch.zeros(n, dtype=torch.int32, device=dev)
        sw = torch.zeros(4 * n, dtype=torch.int32, device=dev)
        sal = torch.arange(0, 32, dtype=torch.int32, device=dev)
        binz = torch.arange(32, 64, dtype=torch.int32, device=dev)
        colscale = torch.zeros(32, device=dev)
        rowvec = torch.zeros(4, n, device=dev)
        cnt = torch.zeros(2, dtype=torch.int32, device=dev)
        op = torch.ops.lpq_ptq161
        bad("gemv 3 salient channels", lambda: op.gemv(xp, qw, sw, binz, sal[:3].contiguous(), colscale, rowvec, None, cnt, n, k, 0, 0))
        bad("gemv float32 x", lambda: op.gemv(xp.float(), qw, sw, binz, sal, colscale, rowvec, None, cnt, n, k, 0, 0))
        bad("gemv x [1, 32]", lambda: op.gemv(xp[:, :32].contiguous(), qw, sw, binz, sal, colscale, rowvec, None, cnt, n, k, 0, 0))
        bad("gemv variant 11", lambda: op.gemv(xp, qw, sw, binz, sal, colscale, rowvec, None, cnt, n, k, 11, 0))
        bad("gemv no counters", lambda: op.gemv(xp, qw, sw, binz, sal, colscale, rowvec, None, cnt[:0], n, k, 0, 0))
        alive(op.gemv(xp, qw, sw, binz, sal, colscale, rowvec, None, cnt, n, k, 0, 0))
''')

# extension -> (loader in this process, [(case, text the error message must contain)])
EXPECTED = {
    "uniform": (lambda: cuda_build.load(), [
        ("gemm bits=5", "bits must be 2, 3, 4 or 8, got 5"),
        ("gemm x [1, 64]", "x must be [m, 128], got [1, 64]"),
        ("gemm warps=9", "warps must be in 1..8"),
        ("dequant fold=48", "fold must be 32, 64 or 128, got 48"),
    ]),
    "lut": (lambda: cuda_build.load_lut(), [
        ("dequant bits=5", "bits must be 2, 3 or 4, got 5"),
        ("gemm x [1, 64]", "x must be [m, 128], got [1, 64]"),
        ("gemm warps=9", "warps must be in 1..8"),
    ]),
    "ptq161": (lambda: ptq161_cuda.load(), [
        ("gemv 3 salient channels", "salient/binarized split does not fit in_features=64"),
        ("gemv float32 x", "activations must be float16 or bfloat16"),
        ("gemv x [1, 32]", "x must be a contiguous CUDA [m, 64] tensor"),
        ("gemv variant 11", "variant must be 0 (automatic), 1 (first kernel), 2"),
        ("gemv no counters", "counters must be int32"),
    ]),
}


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("TORCH_SHOW_CPP_STACKTRACES", None)  # the first message line is what is checked
    return env


@needs_cuda
@pytest.mark.parametrize("ext", sorted(EXPECTED))
def test_failing_check_raises_runtime_error(ext):
    loader, cases = EXPECTED[ext]
    assert loader(), f"the {ext} extension did not build/load here"  # built once here, the child only loads it
    r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, ext], capture_output=True, text=True,
                       timeout=300, env=_child_env(), cwd=str(ROOT))
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert r.returncode == 0, (f"the child died (rc {r.returncode}; -11 = SIGSEGV) after {len(lines)} calls: {lines}\n"
                               f"stderr: {r.stderr[-3000:]}")
    got = {d["case"]: d for d in lines}
    for case, text in cases:
        assert got[case]["raised"] == "RuntimeError", got[case]
        assert text in got[case]["msg"], got[case]
    after = got["valid call after the errors"]
    assert after["finite"], after
    assert after["shape"] == ([1, 32] if ext == "ptq161" else [32, 128]), after
    if ext != "ptq161":
        assert after["all_zero"], after


@pytest.mark.skipif(not IS_LINUX, reason="reads /proc/self/maps")
def test_link_flags_name_the_process_libstdcxx():
    flags = cuda_build._link_flags()
    with open("/proc/self/maps") as f:
        mapped = {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}
    runtime = [p for p in mapped if os.path.basename(p).startswith("libstdc++.so")]
    if not runtime:
        assert flags == []
        pytest.skip("this torch carries its own C++ runtime (no shared libstdc++ mapped)")
    assert len(flags) == 1 and flags[0] in runtime, (flags, runtime)
    with open(flags[0], "rb") as f:
        assert f.read(4) == b"\x7fELF"


def test_cache_key_depends_on_link_flags():
    base = cuda_build._source_hash("sm_90a", ["uniform_binding.cpp"])
    assert cuda_build._source_hash("sm_90a", ["uniform_binding.cpp"], ldflags=[]) == base
    a = cuda_build._source_hash("sm_90a", ["uniform_binding.cpp"], ldflags=["/usr/lib/libstdc++.so.6.0.30"])
    b = cuda_build._source_hash("sm_90a", ["uniform_binding.cpp"], ldflags=["/usr/lib/libstdc++.so.6.0.33"])
    assert len({base, a, b}) == 3
    # a flag must not be confused with a define of the same text
    assert cuda_build._source_hash("sm_90a", ["uniform_binding.cpp"], defines=["-DX"]) != \
        cuda_build._source_hash("sm_90a", ["uniform_binding.cpp"], ldflags=["-DX"])


def test_build_links_with_the_flags_it_hashes(monkeypatch, tmp_path):
    """_build (no GPU, nothing compiled: cpp_extension.load is replaced) passes _link_flags() to the link
    and keys the build folder and the extension name by them."""
    from torch.utils import cpp_extension

    seen = {}
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.update(kw))
    monkeypatch.setattr(cuda_build, "_arch_flags", lambda: ("sm_90a", ["-gencode=arch=compute_90a,code=sm_90a"]))
    monkeypatch.setenv("LPQ_CACHE", str(tmp_path))
    monkeypatch.setenv("MAX_JOBS", "1")  # _build sets a default; keep it from leaking into other tests
    monkeypatch.setattr(cuda_build, "_link_flags", lambda: ["/opt/x/libstdc++.so.6"])
    cuda_build._build("lpq_lut", cuda_build.LUT_SOURCES, cuda_build.LUT_HEADERS)
    assert seen["extra_ldflags"] == ["/opt/x/libstdc++.so.6"]
    tag = cuda_build._source_hash("sm_90a", cuda_build.LUT_SOURCES + cuda_build.LUT_HEADERS, [], ["/opt/x/libstdc++.so.6"])
    assert seen["name"] == f"lpq_lut_{tag}"
    assert seen["build_directory"].endswith(f"lpq_lut-sm_90a-{tag}")
    monkeypatch.setattr(cuda_build, "_link_flags", lambda: [])
    cuda_build._build("lpq_lut", cuda_build.LUT_SOURCES, cuda_build.LUT_HEADERS)
    assert seen["extra_ldflags"] == [] and seen["name"] != f"lpq_lut_{tag}"


def _static_libstdcxx_available() -> bool:
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if not cxx:
        return False
    r = subprocess.run([cxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True)
    return os.path.isabs(r.stdout.strip())


OP_CPP = r'''
#include <ATen/ATen.h>
#include <torch/library.h>
at::Tensor lpqexc_failing(const at::Tensor& x, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4, "lpqexc: bits must be 2 or 4, got ", bits);
  return x.clone();
}
TORCH_LIBRARY(lpqexc, m) { m.def("failing(Tensor x, int bits) -> Tensor"); }
TORCH_LIBRARY_IMPL(lpqexc, CPU, m) { m.impl("failing", &lpqexc_failing); }
'''

CALL = r'''
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.lpqexc.failing(torch.ones(3), 5)
    print("NO ERROR")
except RuntimeError as e:
    print("RAISED", str(e).splitlines()[0])
print("AFTER", float(torch.ops.lpqexc.failing(torch.ones(3), 4).sum()))
'''


@pytest.mark.skipif(not IS_LINUX or shutil.which("ninja") is None or shutil.which("readelf") is None
                    or shutil.which("nm") is None or not _static_libstdcxx_available(),
                    reason="needs Linux, ninja, binutils and a C++ compiler with a static libstdc++")
def test_pinned_libstdcxx_wins_over_a_static_runtime(tmp_path):
    """The device's state forced here with -static-libstdc++ (the .so then defines __cxa_throw and has no
    libstdc++.so.6 in DT_NEEDED); with cuda_build's link flags after it, the extension links the shared
    runtime and a failing check comes back as RuntimeError with its whole message (the static copy
    even loses the number: 'got ' instead of 'got 5', on this CPU machine; on the device it crashed)."""
    from torch.utils import cpp_extension

    src = tmp_path / "op.cpp"
    src.write_text(OP_CPP)
    build = tmp_path / "build"
    build.mkdir()
    cpp_extension.load(name="lpqexc_pinned", sources=[str(src)], extra_cflags=["-O0"],
                       extra_ldflags=["-static-libstdc++", *cuda_build._link_flags()], build_directory=str(build),
                       is_python_module=False, verbose=False)
    so = build / "lpqexc_pinned.so"
    needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    defined = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in needed, needed
    assert "__cxa_throw" not in defined and "__gxx_personality_v0" not in defined
    r = subprocess.run([sys.executable, "-c", CALL, str(so)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RAISED lpqexc: bits must be 2 or 4, got 5" in r.stdout, r.stdout
    assert "AFTER 3.0" in r.stdout
