"""Targeted build of the KV4 kernels into a standalone torch op library (dev tool).

    python -m vllm_qoq.attention.build OUT_DIR [--arch 9.0a]

Compiles csrc/attention/*.cu|*.cpp (+ csrc/common/errors.cu) in parallel with
nvcc/g++ and links OUT_DIR/libqoq_kv4.so, which registers the CUDA kernels of
qoq::kv4_cache_write / kv4_attention / kv4_gather_dequant when loaded with
torch.ops.load_library (tests/gpu/test_kv4_kernels.py and benchmarks/attention.py
do that when QOQ_KV4_LIB points at it).  Much faster than building the whole
vllm_qoq._C extension when only the attention kernels changed; the production path
is still setup.py, which compiles the same sources into vllm_qoq._C.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def build(out_dir: str, archs: list[str]) -> Path:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, include_paths, library_paths

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nvcc = os.path.realpath(
        shutil.which("nvcc") or os.path.join(CUDA_HOME or "/usr/local/cuda", "bin", "nvcc"))
    cuda_home = str(Path(nvcc).parent.parent)
    srcs = sorted(glob.glob(str(ROOT / "csrc" / "attention" / "*.cu")))
    srcs += sorted(glob.glob(str(ROOT / "csrc" / "attention" / "*.cpp")))
    srcs.append(str(ROOT / "csrc" / "common" / "errors.cu"))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{ROOT / 'csrc'}",
                                                   f"-I{sysconfig.get_paths()['include']}",
                                                   f"-I{cuda_home}/include"]
    common = ["-std=c++17", "-O3", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DNDEBUG"]
    extra = os.environ.get("QOQ_KV4_NVCC_FLAGS", "").split()  # tuning experiments
    procs, objs = [], []
    for src in srcs:
        obj = str(out / (Path(src).name + ".o"))
        objs.append(obj)
        if src.endswith(".cu"):
            cmd = [nvcc, src, "-c", "-o", obj, "--expt-relaxed-constexpr", "-lineinfo",
                   "-Xcompiler", "-fPIC", *common, *extra, *incs]
            for a in archs:
                num = a.replace(".", "")
                cmd += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        else:
            cmd = ["g++", src, "-c", "-o", obj, "-fPIC", *common, *incs]
        procs.append((src, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            text=True)))
    failed = False
    for src, p in procs:
        log, _ = p.communicate()
        if p.returncode:
            failed = True
            print(f"FAILED {src}\n{log[-5000:]}", file=sys.stderr)
    if failed:
        raise SystemExit(1)
    lib = out / "libqoq_kv4.so"
    tlib = library_paths()[0]
    # nvcc links the CUDA runtime (statically, its default)
    subprocess.run([nvcc, "-shared", "-o", str(lib), *objs, f"-L{tlib}", "-lc10", "-ltorch_cpu",
                    "-Xlinker", f"-rpath,{tlib}"], check=True)
    return lib


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--arch", action="append", default=None, help="e.g. 9.0a (repeatable)")
    args = ap.parse_args()
    print(build(args.out_dir, args.arch or ["9.0a"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
