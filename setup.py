"""Install tempnet; the Triton kernels in ``kernels/`` install as ``tempnet.kernels``.

The C++ extension is built just in time on first use (ninja, cached). Set
``TEMPNET_BUILD_CPP=1`` to build it ahead of time as ``tempnet._C`` instead (every ``csrc/*.cpp``,
portable flags: ATen's scalar vector fallback, no CPU-specific instructions).
"""

import os
from glob import glob

from setuptools import setup

packages = ["tempnet", "tempnet.backends", "tempnet.demo", "tempnet.integrations", "tempnet.kernels", "tempnet.csrc"]
package_dir = {"tempnet": "tempnet", "tempnet.kernels": "kernels", "tempnet.csrc": "csrc"}
ext_modules, cmdclass = [], {}
if os.environ.get("TEMPNET_BUILD_CPP") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [CppExtension("tempnet._C", sources=sorted(glob("csrc/*.cpp")),
                                extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off"],
                                extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="tempnet",
    version="0.1.0",
    description="Fused softmax losses with per-sample temperatures (Triton, C++, PyTorch) and TempNet",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"tempnet.csrc": ["*.cpp", "*.h"]},
    install_requires=["torch>=2.4", "tqdm", "matplotlib", "numpy"],
    extras_require={"hf": ["transformers", "tokenizers", "accelerate"], "clip": ["open_clip_torch"]},
    entry_points={"console_scripts": ["tempnet=tempnet.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
