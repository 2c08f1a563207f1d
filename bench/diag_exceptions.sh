#!/bin/bash
# Device diagnostic: why a failing TORCH_CHECK inside lpq's CUDA extensions kills the process (rc 139)
# instead of raising RuntimeError (bench/NOTES-kernels.md, "The segfault on a failing argument check").
# Run from the repo root:  OUT=/tmp/diag bash bench/diag_exceptions.sh      (writes $OUT/diag.txt + $OUT/logs/; < 3 min)
# 1. the toolchain the link uses (c++ driver, spec file, where -lstdc++ resolves, env that changes it);
# 2. a throwaway extension (one .cpp op that fails a TORCH_CHECK + one trivial .cu), built with
#    cpp_extension.load as lpq/kernels/cuda_build.py does, once per link-flag variant, in parallel;
#    per variant: the link line, DT_NEEDED, ldd, whether the .so defines __cxa_throw, and a call of the
#    failing op in a subprocess (rc, RuntimeError or not, the message);
# 3. lpq's real uniform extension (cuda_build.load(), as fixed), called directly with bad arguments.
set -u
OUT=${OUT:-/tmp/lpqdiag_out}
D=/tmp/lpqdiag
rm -rf "$D"; mkdir -p "$D" "$OUT/logs"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

# lpq's own imports (rich, click, ...) come from the carried wheels, as in the other device scripts
if ! python3 -c "import rich, click" 2>/dev/null && [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD

{
  echo "== environment that can change the build or link"
  env | grep -E '^(CXX|CC|CUDAHOSTCXX|CUDA_HOME|CUDA_PATH|NVCC_[A-Z_]*|PYTORCH_NVCC|LIBRARY_PATH|LD_LIBRARY_PATH|LD_PRELOAD|LDFLAGS|CFLAGS|CXXFLAGS|CPATH|GCC_EXEC_PREFIX|COMPILER_PATH|PATH|MAX_JOBS|TORCH_[A-Z_]*)=' | sort
  echo "== tools"
  for t in c++ g++ gcc cc ld ninja nvcc; do
    p=$(command -v $t); echo "$t: ${p:-MISSING} -> $( [ -n "$p" ] && readlink -f "$p")"
  done
  echo "== c++ -v"; c++ -v 2>&1 | tail -4
  echo "== where the driver finds the C++ runtime"
  for f in libstdc++.so libstdc++.a libsupc++.a libgcc_s.so libgcc_eh.a specs; do echo "$f: $(c++ -print-file-name=$f)"; done
  echo "libgcc dir: $(dirname "$(c++ -print-libgcc-file-name)")"; ls "$(dirname "$(c++ -print-libgcc-file-name)")" | grep -E 'stdc|supc|specs|gcc_s' | tr '\n' ' '; echo
  echo "== c++ -dumpspecs (lines naming static / stdc++ / as-needed)"
  c++ -dumpspecs | grep -n -i -E 'static-libstdc|stdc\+\+|as-needed' | cut -c1-400
  echo "== library search dirs of the driver"; c++ -print-search-dirs | grep '^libraries' | tr ':' '\n' | head -30
  echo "== ld"; ld -v 2>&1
  echo "== /opt"; ls -la /opt 2>&1 | head -20
  echo "== python / torch"
  python3 - <<'EOF'
import os, torch
from torch.utils import cpp_extension as ce
print("torch", torch.__version__, "cuda", torch.version.cuda, "lib", ce.TORCH_LIB_PATH)
print("CUDA_HOME", ce.CUDA_HOME, "| cxx", ce.get_cxx_compiler())
maps = {l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l or "libgcc_s" in l}
print("C++ runtime mapped after import torch:", sorted(maps))
for d in [ce.TORCH_LIB_PATH] + ([os.path.join(ce.CUDA_HOME, x) for x in ("lib64", "lib")] if ce.CUDA_HOME else []):
    if os.path.isdir(d):
        hits = [f for f in os.listdir(d) if "stdc++" in f or "supc++" in f or "gcc" in f]
        print("C++ runtime files in -L dir", d, ":", hits or "none")
EOF
  echo "== ldd libc10.so (C++ runtime lines)"
  ldd "$(python3 -c 'import torch.utils.cpp_extension as c; print(c.TORCH_LIB_PATH)')/libc10.so" | grep -E 'stdc|gcc_s|libc\.so'
  echo "== nvcc"; nvcc --version | tail -2
} > "$OUT/toolchain.txt" 2>&1

cat > "$D/op.cpp" <<'EOF'
// throwaway: an op whose argument check fails the way lpq's bindings do
#include <ATen/ATen.h>
#include <torch/library.h>
void lpqdiag_touch(void* p);
at::Tensor lpqdiag_failing(const at::Tensor& x, int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4, "lpqdiag: bits must be 2 or 4, got ", bits);
  if (x.is_cuda()) lpqdiag_touch(x.data_ptr());
  return x.clone();
}
TORCH_LIBRARY(lpqdiag, m) { m.def("failing(Tensor x, int bits) -> Tensor"); }
TORCH_LIBRARY_IMPL(lpqdiag, CUDA, m) { m.impl("failing", &lpqdiag_failing); }
TORCH_LIBRARY_IMPL(lpqdiag, CPU, m) { m.impl("failing", &lpqdiag_failing); }
EOF
cat > "$D/k.cu" <<'EOF'
#include <cuda_runtime.h>
__global__ void lpqdiag_kernel(float* p) { if (threadIdx.x > 1024) p[0] = 1.f; }  // never writes
void lpqdiag_touch(void* p) { lpqdiag_kernel<<<1, 1>>>(static_cast<float*>(p)); }
EOF
cat > "$D/build_one.py" <<'EOF'
# build the throwaway extension with one link-flag variant, as lpq/kernels/cuda_build.py builds (no python module)
import os, sys, torch
from torch.utils import cpp_extension
name, flags = sys.argv[1], sys.argv[2:]
if cpp_extension.CUDA_HOME is None and os.environ.get("CUDA_HOME"):  # a CPU-only torch (dry runs off the device)
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
if flags == ["@pin"]:  # lpq's fix, taken from the code under test
    from lpq.kernels import cuda_build
    flags = cuda_build._link_flags()
elif flags and flags[-1] == "@pin":
    from lpq.kernels import cuda_build
    flags = flags[:-1] + cuda_build._link_flags()
major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
arch = "90a" if (major, minor) == (9, 0) else f"{major}{minor}"
bd = f"/tmp/lpqdiag/b_{name}"
os.makedirs(bd, exist_ok=True)
print("EXTRA_LDFLAGS", flags)
cpp_extension.load(name=f"lpqdiag_{name}", sources=["/tmp/lpqdiag/op.cpp", "/tmp/lpqdiag/k.cu"],
                   extra_cflags=["-O3", "-std=c++17"],
                   extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
                   extra_ldflags=flags, build_directory=bd, is_python_module=False, verbose=True)
print("BUILT", os.path.join(bd, f"lpqdiag_{name}.so"))
EOF
cat > "$D/call_one.py" <<'EOF'
# call the failing op directly; exit 0 only if a RuntimeError came back and the process still works
import sys, torch
torch.ops.load_library(sys.argv[1])
dev = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.ones(4, device=dev)
try:
    torch.ops.lpqdiag.failing(x, 5)
    print("NO-ERROR")
    sys.exit(3)
except RuntimeError as e:
    print("RAISED RuntimeError:", str(e).splitlines()[0][:200])
print("after:", float(torch.ops.lpqdiag.failing(x, 4).sum()))
EOF
cat > "$D/call_lpq.py" <<'EOF'
# lpq's real uniform extension, called directly with one bad argument (argv[1]); the Python wrappers are bypassed
import sys, torch
from lpq.kernels import cuda_build
assert cuda_build.load(), cuda_build.failure_reason()
so = sorted({l.split()[-1] for l in open("/proc/self/maps") if "lpq_cuda_" in l})
print("LOADED", so)
case = sys.argv[1]
dev = torch.device("cuda")
bits, n, k = 4, 32, 128
qw = torch.zeros(2 * 1 * 64 * bits, dtype=torch.int32, device=dev)  # 2 n-tiles x 1 chunk x 64 x bits words
sc = torch.zeros(1, 2, 8, dtype=torch.int32, device=dev)
zp = torch.zeros(1, 2, 8, dtype=torch.int16, device=dev)
x = torch.zeros(1, k, dtype=torch.float16, device=dev)
try:
    if case == "gemm_bits5":
        torch.ops.lpq_cuda.uniform_gemm(x, qw, sc, zp, None, 5, 128, 128, n, k, 4, 0)
    elif case == "gemm_xshape":
        torch.ops.lpq_cuda.uniform_gemm(torch.zeros(1, 64, dtype=torch.float16, device=dev), qw, sc, zp, None, bits, 128, 128, n, k, 4, 0)
    elif case == "dequant_bits5":
        torch.ops.lpq_cuda.uniform_dequant(qw, sc, zp, 5, 128, 128, n, k, False)
    print("NO-ERROR"); sys.exit(3)
except RuntimeError as e:
    print("RAISED RuntimeError:", str(e).splitlines()[0][:200])
y = torch.ops.lpq_cuda.uniform_gemm(x, qw, sc, zp, None, bits, 128, 128, n, k, 4, 0)
torch.cuda.synchronize()
print("after: valid call ok", tuple(y.shape))
EOF

cat > "$D/driver.py" <<'EOF'
import os, re, signal, subprocess, sys, time
D, OUT = "/tmp/lpqdiag", os.environ["OUT"]
VARIANTS = {  # name -> extra_ldflags
    "default": [],
    "lstdcxx": ["-lstdc++"],
    "sharedlibgcc": ["-shared-libgcc", "-lstdc++"],
    "noasneeded": ["-Wl,--no-as-needed", "-lc10", "-ltorch_cpu", "-ltorch", "-lstdc++", "-Wl,--as-needed"],
    "pin": ["@pin"],  # lpq's fix: the process's libstdc++.so by path (cuda_build._link_flags())
    "static": ["-static-libstdc++"],  # forces the suspected state: should reproduce the crash
    "static_pin": ["-static-libstdc++", "@pin"],  # the fix must win over a forced static runtime
    "trace": ["-v", "-Wl,--trace"],  # default link, with the driver's collect2 line and every input file used
}
if os.environ.get("DIAG_VARIANTS"):  # a subset, e.g. DIAG_VARIANTS=default,pin
    VARIANTS = {k: v for k, v in VARIANTS.items() if k in os.environ["DIAG_VARIANTS"].split(",")}
env = dict(os.environ, MAX_JOBS="2")
procs = {}
t0 = time.time()
for name, flags in VARIANTS.items():
    log = open(f"{D}/build_{name}.log", "w")
    procs[name] = (subprocess.Popen([sys.executable, f"{D}/build_one.py", name, *flags], stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True), log)
lpq_log = open(f"{D}/build_lpq.log", "w")
lpq = subprocess.Popen([sys.executable, "-c", "from lpq.kernels import cuda_build as c; ok = c.load(); print('LPQ LOAD', ok, c.failure_reason()); print('LINK FLAGS', c._link_flags())"],
                       stdout=lpq_log, stderr=subprocess.STDOUT, env=dict(os.environ, LPQ_BUILD_VERBOSE="1", MAX_JOBS="8"),
                       start_new_session=True)

def wait(p, limit):
    try:
        return p.wait(timeout=max(1, limit - (time.time() - t0)))
    except subprocess.TimeoutExpired:  # the build's own session: ninja and the compilers go with it
        os.killpg(p.pid, signal.SIGKILL); p.wait(); return "timeout"

def sh(cmd):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (r.stdout + r.stderr).strip()

def inspect(so):
    needed = re.findall(r"\[(.*?)\]", sh(f"readelf -d {so} | grep NEEDED"))
    dyn = sh(f"nm -D {so} | grep -E ' (__cxa_throw|__gxx_personality_v0|_Unwind_RaiseException)$| (__cxa_throw|__gxx_personality_v0)@'")
    ndef = sh(f"nm -D --defined-only {so} | wc -l")
    return needed, dyn, ndef

def call(args, limit=60):
    try:
        r = subprocess.run([sys.executable, "-X", "faulthandler", *args], capture_output=True, text=True, timeout=limit)
        return r.returncode, (r.stdout + r.stderr).strip()
    except subprocess.TimeoutExpired:
        return "timeout", ""

rows, details = [], []
for name, (p, log) in procs.items():
    rc = wait(p, 100); log.close()
    text = open(f"{D}/build_{name}.log").read()
    link = next((l for l in text.splitlines() if " -shared " in l and l.rstrip().endswith(".so")), "(no link line)")
    so = f"{D}/b_{name}/lpqdiag_{name}.so"
    if rc != 0 or not os.path.exists(so):
        rows.append(f"{name:13s} BUILD FAILED rc={rc}: {text.strip().splitlines()[-1:]}")
        details.append(f"--- {name}: build failed\n{text[-3000:]}")
        continue
    needed, dyn, ndef = inspect(so)
    crc, cout = call([f"{D}/call_one.py", so])
    raised = "RAISED RuntimeError" in cout
    stdcxx = [n for n in needed if "stdc++" in n]
    owns = "T __cxa_throw" in dyn
    rows.append(f"{name:13s} rc={crc!s:>4} raised={raised!s:5} libstdc++ NEEDED={bool(stdcxx)!s:5} defines __cxa_throw={owns!s:5} "
                f"defined dynsyms={ndef}  msg={[l for l in cout.splitlines() if 'RAISED' in l][:1]}")
    details.append(f"--- {name}: flags {VARIANTS[name]}\nlink: {link.strip()}\nNEEDED: {needed}\nnm -D: {dyn}\n"
                   f"ldd:\n{sh('ldd ' + so)}\ncall rc={crc}:\n{cout[-1500:]}")
    if name == "trace":
        keep = [l for l in text.splitlines() if "collect2" in l or re.search(r"stdc\+\+|supc\+\+|gcc_s|gcc_eh|libc10|libtorch", l)]
        details.append("--- trace: collect2 line and the C++ runtime / torch inputs the linker opened\n" + "\n".join(keep[:80]))

rc = wait(lpq, 140); lpq_log.close()
lpq_text = open(f"{D}/build_lpq.log").read()
lpq_link = [l for l in lpq_text.splitlines() if " -shared " in l]
rows.append("")
rows.append(f"lpq uniform build: rc={rc} {[l for l in lpq_text.splitlines() if l.startswith(('LPQ LOAD', 'LINK FLAGS'))]}")
details.append("--- lpq uniform link line:\n" + "\n".join(lpq_link[-1:]) + "\n" + lpq_text[-1500:])
if rc == 0 and "LPQ LOAD True" in lpq_text:
    for case in ("gemm_bits5", "gemm_xshape", "dequant_bits5"):
        crc, cout = call([f"{D}/call_lpq.py", case], limit=25)
        rows.append(f"lpq {case:14s} rc={crc!s:>4} raised={'RAISED RuntimeError' in cout!s:5} "
                    f"{[l for l in cout.splitlines() if l.startswith(('RAISED', 'after', 'NO-ERROR'))]}")
        details.append(f"--- lpq {case}: rc={crc}\n{cout[-1500:]}")
        m = re.search(r"LOADED \['(.*?)'", cout)
        if m and case == "gemm_bits5":
            needed, dyn, ndef = inspect(m.group(1))
            rows.append(f"lpq .so {m.group(1)}: NEEDED={needed} | {dyn.replace(chr(10), ' ; ')}")
with open(f"{OUT}/diag.txt", "w") as f:
    f.write(f"elapsed {time.time() - t0:.0f} s\n\n== summary (rc of the call subprocess: 0 = RuntimeError caught and process fine; -11 = SIGSEGV; -6 = abort)\n")
    f.write("\n".join(rows) + "\n\n== toolchain\n" + open(f"{OUT}/toolchain.txt").read() + "\n== details\n" + "\n\n".join(details) + "\n")
print("\n".join(rows))
EOF
OUT="$OUT" timeout 178 python3 "$D/driver.py"
cp "$D"/*.log "$OUT/logs/" 2>/dev/null
echo "diag_exc: $(( $(date +%s) - T0 )) s; summary in \$OUT/diag.txt"
