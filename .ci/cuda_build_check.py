"""Compile every csrc/ source with nvcc against the installed torch's headers.

A build check for machines without a GPU (CI): CUDA torch is not needed, the
CPU wheel ships the c10/cuda headers (not ATen/cuda/CUDAContext.h's cuBLAS and
cuSPARSE dependencies: kernels include <c10/cuda/CUDAStream.h> and
<c10/cuda/CUDAGuard.h> instead).  Objects are compiled, not linked
(there is no libtorch_cuda to link against).  Exit status 1 if any file fails.

    python .ci/cuda_build_check.py [--arch 9.0a --arch 8.0 ...] [files...]
"""

import argparse
import concurrent.futures as cf
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ["8.0", "8.9", "9.0a"]


def gencode(arch: str) -> list[str]:
    num = arch.replace(".", "")
    return ["-gencode", f"arch=compute_{num},code=sm_{num}"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", action="append", help="e.g. 9.0a (repeatable); default all")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("files", nargs="*")
    args = ap.parse_args()
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        print("cuda_build_check: nvcc not found, skipping the CUDA build check")
        return 0
    import torch
    from torch.utils.cpp_extension import include_paths

    files = args.files or sorted(
        glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True)
        + glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True)
    )
    if not files:
        print("cuda_build_check: no sources in csrc/")
        return 0
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    incs = [f"-I{p}" for p in include_paths()] + [
        f"-I{os.path.join(ROOT, 'csrc')}",
        # generated c10 header missing from the CPU wheel (see the file)
        f"-I{os.path.join(ROOT, '.ci', 'shim')}",
        f"-I{sysconfig.get_paths()['include']}",
    ]
    common = incs + [
        "-std=c++17",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-c",
    ]
    archs = args.arch or ARCHS
    out = tempfile.mkdtemp(prefix="qoq-buildcheck-")

    def build(src: str):
        obj = os.path.join(out, os.path.basename(src) + ".o")
        if src.endswith(".cu"):
            cmd = [nvcc, src, "-o", obj, "-O2", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]
            for a in archs:
                cmd += gencode(a)
        else:
            cmd = ["g++", src, "-o", obj, "-O1", "-fPIC"]
        r = subprocess.run(cmd + common, capture_output=True, text=True)
        return src, r.returncode, r.stdout + r.stderr

    failed = 0
    with cf.ThreadPoolExecutor(args.jobs) as ex:
        for src, rc, log in ex.map(build, files):
            rel = os.path.relpath(src, ROOT)
            print(f"{'ok  ' if rc == 0 else 'FAIL'} {rel}", flush=True)
            if rc:
                failed += 1
                print(log[-6000:])
    shutil.rmtree(out, ignore_errors=True)
    print(f"cuda_build_check: {len(files) - failed} compiled, {failed} failed ({', '.join(archs)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
