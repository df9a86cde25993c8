"""vllm_qoq: QoQ (W4A8KV4) quantization for vLLM.

Builds the CUDA extension `vllm_qoq._C` from csrc/ when the installed torch has
CUDA (and nvcc is found); otherwise installs as pure Python and the reference
ops are used.  Environment:
  MAX_JOBS                  parallel compile jobs (torch's BuildExtension honours it)
  TORCH_CUDA_ARCH_LIST      default "8.0;8.9;9.0a" (sm_80, sm_89, sm_90a)
  VLLM_QOQ_NO_EXTENSION=1   force the pure-Python install
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;8.9;9.0a"


def cuda_extension():
    if os.environ.get("VLLM_QOQ_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        # pip's build isolation hides the installed torch: say so instead of silently
        # installing without kernels.
        print(
            f"vllm_qoq: torch cannot be imported in this build environment ({e}): pure-Python "
            "install, no CUDA kernels. To build them: pip install --no-build-isolation ."
        )
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("vllm_qoq: torch has no CUDA (or nvcc not found): pure-Python install")
        return [], {}
    sources = sorted(
        glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)
        + glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    )
    if not sources:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    ext = CUDAExtension(
        name="vllm_qoq._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": [
                "-O3",
                "-std=c++17",
                "--expt-relaxed-constexpr",
                "-lineinfo",
                "-DNDEBUG",
            ],
        },
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()

setup(
    name="vllm_qoq",
    version="0.1.0",
    description="QoQ (W4A8KV4) quantization for vLLM: plugin, CUDA kernels, converters",
    packages=find_packages(include=["vllm_qoq", "vllm_qoq.*", "converters", "converters.*"]),
    package_data={"vllm_qoq": ["lm_eval_tasks/*/*.yaml", "lm_eval_tasks/*/*.py", "lm_eval_tasks/*.md"]},
    python_requires=">=3.10",
    install_requires=["torch", "safetensors", "transformers", "tqdm", "accelerate"],
    extras_require={"test": ["pytest", "lm-eval"], "vllm": ["vllm>=0.26"]},
    entry_points={
        "vllm.general_plugins": ["qoq = vllm_qoq:register"],
        "console_scripts": ["vllm-qoq = converters.cli:main"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
