"""Build (on first use) and load lpq's CUDA kernels, and declare their fake implementations.

The sources in ``csrc/`` are compiled with ``torch.utils.cpp_extension.load`` for the GPU that is
present (``sm_90a`` on Hopper), once, into a cache folder (``$LPQ_CACHE`` or
``~/.cache/lpq/kernels``) keyed by the sources, torch's version, the architecture and the link
flags (the process's shared libstdc++ is named on the link line: see :func:`_link_flags`). The
extension registers the ops ``torch.ops.lpq_cuda.uniform_gemm`` and ``...uniform_dequant``; the fake
(meta) implementations registered here let them run under ``torch.compile`` and CUDA graphs.

Every extension of lpq (these ops, the squeezellm LUT ops, the ptq161 and the attention kernels) is an
:class:`Extension`. Without CUDA, without nvcc, or when a build fails, its ``load()`` returns False and one
warning says why (one for the whole machine when CUDA or nvcc is missing); the callers then fall back to the
reference kernel (SDPA for attention). Importing this module never builds anything.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from .w3_layout import W3_LAYOUT

log = logging.getLogger("lpq.kernels")

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ["uniform_binding.cpp", "uniform_launch.cu", "uniform_b2.cu", "uniform_b3.cu", "uniform_b4.cu", "uniform_b8.cu"]
HEADERS = ["uniform_kernels.cuh", "uniform_dispatch.cuh", "uniform_launch.h", "async_copy.cuh"]
# the squeezellm LUT kernels: a second extension (ops lpq_lut::*), so that a failure in one never takes the other down
LUT_SOURCES = ["squeezellm_binding.cpp", "squeezellm_launch.cu", "squeezellm_b2.cu", "squeezellm_b3.cu", "squeezellm_b4.cu"]
LUT_HEADERS = ["squeezellm_kernels.cuh", "squeezellm_launch.h", "async_copy.cuh"]

_lock = threading.Lock()


def _arch_flags() -> tuple[str, list[str]]:
    major, minor = torch.cuda.get_device_capability()
    cc = f"{major}{minor}"
    if major == 9 and minor == 0:  # Hopper: the arch-specific target (sm_90a) runs on every sm_90 part
        return "sm_90a", ["-gencode=arch=compute_90a,code=sm_90a"]
    return f"sm_{cc}", [f"-gencode=arch=compute_{cc},code=sm_{cc}"]


def _cache_dir(tag: str) -> Path:
    root = Path(os.environ.get("LPQ_CACHE", Path.home() / ".cache" / "lpq")) / "kernels" / tag
    root.mkdir(parents=True, exist_ok=True)
    return root


def _source_hash(arch: str, files: list[str] | None = None, defines: list[str] | None = None,
                 ldflags: list[str] | None = None) -> str:
    h = hashlib.sha256()
    for name in files or SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    for d in defines or []:
        h.update(d.encode())
    # the link flags are part of the key: an extension linked the old way must never be reused
    for f in ldflags or []:
        h.update(b"\0ld:" + f.encode())
    h.update(torch.__version__.encode())
    h.update(str(torch.version.cuda).encode())
    h.update(arch.encode())
    return h.hexdigest()[:12]


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot be built here (cheap; builds nothing), or None."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc (the CUDA toolkit) was not found: set CUDA_HOME"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return f"compute capability {major}.x < 8.0 (the kernels use bf16/fp16 mma.sync)"
    return None


def _register_fakes() -> None:
    @torch.library.register_fake("lpq_cuda::uniform_gemm")
    def _gemm_fake(x, qw, sc, zp, bias, bits, fold, gs, n, k, warps, variant=0, norm_x=None, norm_eps=0.0, swiglu=False,
                   norm_sq=None):
        return x.new_empty((x.shape[0], n // 2 if swiglu else n))

    @torch.library.register_fake("lpq_cuda::uniform_gemm_residual")
    def _gemm_residual_fake(x, qw, sc, zp, bias, bits, fold, gs, n, k, warps, variant, residual, next_w):
        m = x.shape[0]
        return x.new_empty((m, n)), x.new_empty((m, n)), x.new_empty((m, sc.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("lpq_cuda::uniform_dequant")
    def _dequant_fake(qw, sc, zp, bits, fold, gs, n, k, bf16):
        return qw.new_empty((n, k), dtype=torch.bfloat16 if bf16 else torch.float16)


def _process_libstdcxx() -> str | None:
    """Path of the shared libstdc++ mapped into this process (the one torch's libc10 runs on), or None
    (not Linux, /proc unreadable, or a C++ runtime linked statically into torch)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                if len(fields) == 6 and os.path.basename(fields[5].strip()).startswith("libstdc++.so"):
                    path = fields[5].strip()
                    # the ninja file joins link flags with spaces, unquoted: such a path cannot be passed
                    if os.path.isfile(path) and not any(c.isspace() for c in path):
                        return path
    except OSError:
        return None
    return None


def _link_flags() -> list[str]:
    """Extra linker inputs for the extensions: the process's shared libstdc++, named by path.

    Why: on the device, the linker driver resolved the C++ runtime to a static copy (the built .so
    defined __cxa_throw itself and had no libstdc++.so.6 in DT_NEEDED), so an exception thrown by a
    failing TORCH_CHECK (thrown from libc10 by its own libstdc++) crossed frames of a second EH
    runtime and the process died (SIGSEGV) instead of raising RuntimeError. A shared object given by
    path as an input ahead of the driver's implicit ``-lstdc++`` (static or not) binds every C++
    runtime symbol to it, whatever ``-static-libstdc++``, spec file or library search order the
    toolchain brings; the static archive then contributes nothing. Empty when no shared libstdc++
    is mapped (nothing to pin to; the toolchain's default is kept)."""
    lib = _process_libstdcxx()
    return [lib] if lib else []


def _build(prefix: str = "lpq_cuda", sources: list[str] | None = None, headers: list[str] | None = None) -> None:
    from torch.utils import cpp_extension

    sources = sources or SOURCES
    arch, gencode = _arch_flags()
    # LPQ_W3_LAYOUT=planes: the earlier 3-bit layout, for comparisons (w3_layout.py; the repack agrees)
    defines = ["-DLPQ_W3_PLANES=1"] if prefix == "lpq_cuda" and W3_LAYOUT == "planes" else []
    ldflags = _link_flags()
    tag = _source_hash(arch, sources + (headers or HEADERS), defines, ldflags)
    build_dir = _cache_dir(f"{arch}-{tag}" if prefix == "lpq_cuda" else f"{prefix}-{arch}-{tag}")
    os.environ.setdefault("MAX_JOBS", str(max(1, min(8, os.cpu_count() or 1))))
    cpp_extension.load(
        name=f"{prefix}_{tag}",
        sources=[str(CSRC / s) for s in sources],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", *gencode, "-lineinfo", *defines],
        extra_include_paths=[str(CSRC)],
        extra_ldflags=ldflags,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=bool(os.environ.get("LPQ_BUILD_VERBOSE")),
    )
    log.info("lpq CUDA kernels loaded from %s", build_dir)


def _register_lut_fakes() -> None:
    @torch.library.register_fake("lpq_lut::lut_gemm")
    def _lut_gemm_fake(x, qw, tab, sp_ptr, sp_e, bias, bits, n, k, warps, variant=0):
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("lpq_lut::lut_dequant")
    def _lut_dequant_fake(qw, tab, bits, n, k, bf16):
        return qw.new_empty((n, k), dtype=torch.bfloat16 if bf16 else torch.float16)


class Extension:
    """One of lpq's CUDA extensions: its sources, built on first use (:func:`_build`, cached on disk), and the fake
    implementations of its ops. ``load()`` says whether its ops are usable; when they are not, lpq falls back to
    ``fallback`` and the reason is said once: a machine without CUDA or nvcc gets ONE warning for all extensions
    (the uniform kernels' own, :data:`UNIFORM`), a failed build one warning of its own. Separate extensions, so
    that a failure in one never takes the others down."""

    def __init__(self, prefix: str, sources: list[str], headers: list[str], register_fakes, what: str,
                 fallback: str = "the reference kernel") -> None:
        self.prefix, self.sources, self.headers = prefix, sources, headers
        self.register_fakes, self.what, self.fallback = register_fakes, what, fallback
        self.state: dict = {"tried": False, "ok": False, "reason": None}

    @property
    def ok(self) -> bool:
        return self.state["ok"]

    def failure_reason(self) -> str | None:
        return self.state["reason"]

    def _warn(self, reason: str) -> None:
        warnings.warn(f"lpq: {self.what} unavailable ({reason}); using {self.fallback}", RuntimeWarning, stacklevel=3)
        log.warning("%s unavailable (%s); using %s", self.what, reason, self.fallback)

    def load(self) -> bool:
        """Build/load once; True if the ops are usable."""
        if self.state["tried"]:
            return self.state["ok"]
        no_cuda = False
        with _lock:
            if self.state["tried"]:
                return self.state["ok"]
            reason = unavailable_reason()
            if reason is not None:
                no_cuda = True
            else:
                try:
                    _build(self.prefix, self.sources, self.headers)
                    self.register_fakes()
                except Exception as e:  # a failed build must never crash a forward pass
                    reason = f"building the {self.what} failed: {type(e).__name__}: {str(e).strip()[-2000:]}"
                    self._warn(reason)
            self.state.update(tried=True, ok=reason is None, reason=reason)
        if no_cuda:
            if self is UNIFORM:
                self._warn(reason)
            else:
                UNIFORM.load()  # the one warning about a machine without CUDA/nvcc
        return self.state["ok"]


UNIFORM = Extension("lpq_cuda", SOURCES, HEADERS, _register_fakes, "CUDA kernels")
LUT = Extension("lpq_lut", LUT_SOURCES, LUT_HEADERS, _register_lut_fakes, "squeezellm CUDA kernels")


def load() -> bool:
    """Build/load the uniform kernels' extension once (ops lpq_cuda::*). True if usable, else False (one warning)."""
    return UNIFORM.load()


def failure_reason() -> str | None:
    return UNIFORM.failure_reason()


def load_lut() -> bool:
    """Build/load the squeezellm LUT extension once (ops lpq_lut::*); see :class:`Extension`."""
    return LUT.load()


def lut_failure_reason() -> str | None:
    return LUT.failure_reason()
