"""Build csrc/attention/* (+ common/errors.cu) as a loadable torch op library, for A/B runs of
compile-time variants (QOQ_KV4_LIB / benchmarks/attention.py --lib).  Device-side helper.

    python benchmarks/device/build_kv4_lib.py NAME [-DMACRO=VALUE ...]   -> prints the .so path
"""
import glob
import os
import sys

from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
name, defs = sys.argv[1], sys.argv[2:]
srcs = sorted(glob.glob(os.path.join(ROOT, "csrc/attention/*.cu"))) + [
    os.path.join(ROOT, "csrc/attention/bindings.cpp"), os.path.join(ROOT, "csrc/common/errors.cu")]
bdir = os.path.join("/tmp/kv4libs", name)
os.makedirs(bdir, exist_ok=True)
load(name=name, sources=srcs, build_directory=bdir, is_python_module=False, verbose=False,
     extra_include_paths=[os.path.join(ROOT, "csrc")],
     extra_cflags=["-O3", "-std=c++17"] + defs,
     extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr",
                        "-gencode=arch=compute_90a,code=sm_90a"] + defs)
print(os.path.join(bdir, name + ".so"))
