"""Compile-time variants of the mma.sync GEMM (path 1) at small M, timed on the device.

    python3 benchmarks/device/sm80_variants.py build [--only base,...]   # /tmp/sm80v/<variant>.so
    python3 benchmarks/device/sm80_variants.py time OUT.json [--m 8,16] [--only base,...] [--cfgs 0,3,14]

Each variant is benchmarks/device/sm80_variants.cu built against a scratch copy of csrc/,
patched as PATCHES says (asserting every line it patches, so a drifted source fails loudly).
Tile configurations 0-21 are the TileCfg list in the .cu (0 = CfgSmall, 1 = CfgSmallN,
3 = CfgSmallK, 14 = CfgMid; 14-21 have 32- or 64-row tiles; the patched builds have 0, 1
and 3 only).  The extension's default choice (`ext@0`), path 1 and path 3 are timed
next to them where the extension is built.  The timing is gemm.py's: each call
captured in a CUDA graph over enough weight copies to defeat L2.  Every output is compared bit
for bit with configuration 0 of the unpatched build (and the extension's path 1, `ext@1`, when
built), so a configuration or patch that computes something else is reported -- except noxor
and nodq, timing probes that change results on purpose.
"""
import ctypes
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = "/tmp/sm80v"
KERNEL = "csrc/gemm/w4a8_sm80.cuh"
DEVICE = "csrc/common/device.cuh"
LB_OLD = "__global__ void __launch_bounds__(C::THREADS) w4a8_sm80_kernel("
DQ_OLD = ("            b0 = dev::dequant_g128(b0, s2, z4);\n"
          "            b1 = dev::dequant_g128(b1, s2, z4);\n")
XOR_OLD = "  return (u4 * s2 + zc) ^ 0x80808080u;\n"
PER_OLD = "    per = std::max<int64_t>(std::min<int64_t>(2, kt), (total + grid_want - 1) / grid_want);\n"
# name -> (few configurations only, [(file, old, new)])
PATCHES = {
    "base": (False, []),
    # split-K parts that divide a tile's k-tiles: no CTA crosses a tile boundary (grid <= one wave)
    "aligned": (False, [(KERNEL, PER_OLD, PER_OLD + "    while (kt % per) ++per;\n")]),
    # 3 CTAs of 256 threads per SM: at most 85 registers (the default uses 126: 2 per SM)
    "minb3": (True, [(KERNEL, LB_OLD, LB_OLD.replace("(C::THREADS)", "(C::THREADS, 3)"))]),
    # g128 offset-binary codes without the XOR (as an s8 x u8 mma would take them): cost probe
    "noxor": (True, [(DEVICE, XOR_OLD, "  return u4 * s2 + zc;\n")]),
    # stream-K shares of at least 4 / 8 k-tiles (fewer split-K parts per tile, fewer CTAs)
    "minper4": (True, [(KERNEL, PER_OLD, PER_OLD.replace("min<int64_t>(2, kt)", "min<int64_t>(4, kt)"))]),
    "minper8": (True, [(KERNEL, PER_OLD, PER_OLD.replace("min<int64_t>(2, kt)", "min<int64_t>(8, kt)"))]),
    # g128 without any dequantization (the codes go to the mma as they are): cost probe
    "nodq": (True, [(KERNEL, DQ_OLD, "            (void)s2; (void)z4;\n")]),
}
# the builds that change results on purpose (timing probes of the g128 dequantization)
PROBES = ("noxor", "nodq")
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
          (10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)]


def build(only):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    os.makedirs(BUILD, exist_ok=True)
    procs = []
    for name, (few, patches) in PATCHES.items():
        if only and name not in only:
            continue
        tree = os.path.join(BUILD, name)
        shutil.rmtree(tree, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(tree, "csrc"))
        for f, old, new in patches:
            p = os.path.join(tree, f)
            s = open(p).read()
            assert s.count(old) == 1, f"{name}: patch target not found once in {f}"
            open(p, "w").write(s.replace(old, new))
        # hidden symbols and no STB_GNU_UNIQUE: the kernels' per-instantiation statics (the
        # one-time cudaFuncSetAttribute of launch()) would otherwise be one object across every
        # variant library and the extension in the process, so only the first would set up
        cmd = [nvcc, "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden,-fno-gnu-unique", "-O3", "-std=c++17", "--expt-relaxed-constexpr",
               "-gencode=arch=compute_90a,code=sm_90a", f"-I{tree}/csrc",
               os.path.join(ROOT, "benchmarks/device/sm80_variants.cu"), f"{tree}/csrc/common/errors.cu",
               "-o", os.path.join(BUILD, name + ".so")] + (["-DVAR_FEW"] if few else [])
        procs.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    t = time.time()
    for name, p in procs:
        out, _ = p.communicate()
        print(f"{name}: rc {p.returncode}" + ("" if p.returncode == 0 else "\n" + out[-3000:]))
    print(f"built in {time.time() - t:.0f} s")


def run_time(out_path, ms, only, cfgs):
    import torch
    sys.path.insert(0, ROOT)
    from benchmarks.gemm import HBM_TBPS, time_graph
    libs = {}
    for name in PATCHES:
        if only and name not in only:
            continue
        lib = ctypes.CDLL(os.path.join(BUILD, name + ".so"))
        lib.qoq_var_run.restype = ctypes.c_int
        lib.qoq_var_run.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 9 + [
            ctypes.c_int] * 3 + [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p]
        libs[name] = lib
    ext = None
    try:
        from vllm_qoq import ops
        ops.register_ops()
        if ops.has_cuda_kernels():
            ext = torch.ops.qoq_debug
    except Exception as e:  # the extension is optional here
        print("extension not used:", e)
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    ws_ints = 1 << 26
    ws = torch.zeros(ws_ints, dtype=torch.int32, device="cuda")
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    rows, checks = [], []
    t0 = time.time()
    for (n, k) in SHAPES:
        for m in ms:
            for variant in ("chn", "g128"):
                g128 = variant == "g128"
                wbytes = n * k // 2
                copies = min(64, max(1, math.ceil(3 * l2 / wbytes)))
                ops_ = []
                for _ in range(copies):
                    qx = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=gen)
                    sx = torch.rand(m, device="cuda", generator=gen) * 0.01 + 0.001
                    qsum = qx.int().sum(1).int()
                    qw = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8, generator=gen)
                    sc = (torch.rand(n, device="cuda", generator=gen) * 0.01 + 0.001).half()
                    sz = (torch.rand(n, device="cuda", generator=gen) * 0.1).half()
                    s2 = torch.randint(1, 9, (k // 128, n), device="cuda", dtype=torch.uint8, generator=gen)
                    zn = ((256 - 8 * s2.int()) % 256).to(torch.uint8)
                    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                    ops_.append((qx, sx, qsum, qw, sc, sz, s2, zn, out))
                est = max(2.0, wbytes / (HBM_TBPS * 1e6))
                impls = []
                for name, (few, _) in PATCHES.items():
                    if name not in libs or (name in PROBES and not g128):
                        continue
                    ncfg = libs[name].qoq_var_ncfg()
                    for cfg in (range(ncfg) if ncfg > 0 else (0, 1, 3)):
                        if cfg == 0 or not cfgs or cfg in cfgs:  # c0: the bit-for-bit reference
                            impls.append((f"{name}:c{cfg}", name, cfg))
                if ext is not None:
                    impls += [("ext@0", None, 0), ("ext@1", None, 1)]
                    impls += [("ext@6", None, 6)] if m <= 32 else [("ext@3", None, 3)]
                ref = None
                for label, name, cfg in impls:
                    def mk(o, name=name, cfg=cfg):
                        qx, sx, qsum, qw, sc, sz, s2, zn, out = o
                        if name is None:
                            return lambda: ext.w4a8_gemm(
                                qx, sx, None if g128 else qsum, qw, sc, None if g128 else sz,
                                s2 if g128 else None, zn if g128 else None, None, torch.bfloat16, cfg)
                        lib = libs[name]
                        args = (cfg, int(g128), qx.data_ptr(), sx.data_ptr(), qsum.data_ptr(), qw.data_ptr(),
                                sc.data_ptr(), sz.data_ptr(), s2.data_ptr(), zn.data_ptr(), out.data_ptr(),
                                m, n, k, ws.data_ptr(), ws_ints, sms)

                        def f():
                            rc = lib.qoq_var_run(*args, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
                            if rc:
                                raise RuntimeError(f"{name} c{cfg} failed")
                            return out
                        return f
                    fns = [mk(o) for o in ops_]
                    try:
                        o0 = fns[0]().clone()
                        torch.cuda.synchronize()
                        if label == "base:c0":
                            ref = o0
                        elif ref is not None and name not in PROBES:
                            same = bool(torch.equal(o0, ref))
                            if not same:
                                checks.append({"M": m, "N": n, "K": k, "variant": variant, "impl": label,
                                               "max_abs_diff": float((o0.float() - ref.float()).abs().max())})
                        us = time_graph(fns, est)
                    except Exception as e:
                        print(f"{label} {variant} M={m} {n}x{k}: {e}")
                        continue
                    rows.append({"M": m, "N": n, "K": k, "impl": f"{variant}:{label}", "us": round(us, 3)})
                print(f"{n}x{k} M={m} {variant}: " + " ".join(
                    f"{r['impl'].split(':', 1)[1]}={r['us']:.1f}" for r in rows
                    if r["M"] == m and r["N"] == n and r["K"] == k and r["impl"].startswith(variant + ":")),
                    flush=True)
                del ops_
                torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "torch": torch.__version__, "command": "python3 benchmarks/device/sm80_variants.py " + " ".join(sys.argv[1:]),
           "patches": {k: [(f, o, n) for f, o, n in v[1]] for k, v in PATCHES.items()},
           "rows": rows, "mismatches": checks}
    json.dump(res, open(out_path, "w"), indent=1)
    print(f"timed in {time.time() - t0:.0f} s; {len(checks)} mismatches: {checks[:5]}")


if __name__ == "__main__":
    def opt(flag):
        return sys.argv[sys.argv.index(flag) + 1].split(",") if flag in sys.argv else []
    only = opt("--only")
    if sys.argv[1] == "build":
        build(only)
    else:
        run_time(sys.argv[2], [int(x) for x in opt("--m")] or [8, 16], only, [int(x) for x in opt("--cfgs")])
