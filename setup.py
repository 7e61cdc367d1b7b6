"""Build uae_dist and, when C++ sources exist in csrc/, the uae_dist._C extension.

CPU kernels are always built; CUDA kernels only when the installed torch was built with CUDA
(``torch.version.cuda``) and ``UAE_FORCE_CPU`` is not set. Without the extension every op falls back
to pure PyTorch, so ``pip install -e .`` never fails just because a compiler is missing.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp or os.environ.get("UAE_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    use_cuda = bool(torch.version.cuda) and os.environ.get("UAE_FORCE_CPU", "0") != "1"
    cxx = ["-O3", "-fopenmp", "-DNDEBUG", "-ffp-contract=off", "-fno-math-errno"]
    ext_kwargs = dict(
        name="uae_dist._C",
        sources=cpp,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if use_cuda:
        ext_kwargs["sources"] = cpp + sorted(glob.glob(os.path.join("csrc", "*.cu")))
        ext_kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "--fmad=false"]
        ext_kwargs["define_macros"] = [("WITH_CUDA", None)]
        ext = CUDAExtension(**ext_kwargs)
    else:
        ext = CppExtension(**ext_kwargs)
    # UAE_USE_NINJA=1 compiles the sources in parallel (MAX_JOBS) when ninja is installed; the default
    # stays the plain sequential build
    ninja = os.environ.get("UAE_USE_NINJA", "0") == "1"
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=ninja)}


def version():
    ns = {}
    with open(os.path.join(ROOT, "uae_dist", "_version.py")) as fh:
        exec(fh.read(), ns)
    return ns["__version__"]


ext_modules, cmdclass = extensions()

setup(
    name="uae-dist",
    version=version(),
    description="Distributed training of universal atomic embeddings (UAEs) for crystals",
    packages=find_packages(include=["uae_dist", "uae_dist.*"]),
    # the shipped configs (uae-dist pretrain --config NAME) and element tables travel with the package
    package_data={"uae_dist": ["configs/*.yaml", "configs/ds/*.json", "tables/*/*", "splits/*.json"]},
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["uae-dist=uae_dist.cli:main"]},
    zip_safe=False,
)
