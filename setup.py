"""Build the optional C kernels (prunerecipe._native); everything else is in pyproject.toml.

The kernels only make float32 magnitude pruning faster. Without a C compiler the build
carries on without them and prunerecipe uses its pure-PyTorch path, with the same results.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class optional_build_ext(build_ext):
    """Build C extensions if possible; warn, not fail, when they cannot be built."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, no Python headers, ...
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._skip(exc)

    def _skip(self, exc):
        if os.environ.get("PRUNERECIPE_REQUIRE_NATIVE"):
            raise exc
        sys.stderr.write(f"warning: prunerecipe's optional C kernels were not built ({exc}); the pure-PyTorch path will be used\n")


native = Extension(
    "prunerecipe._native",
    sources=["prunerecipe/_native.c"],
    extra_compile_args=["-O3", "-std=c99", "-fno-strict-aliasing"] if os.name == "posix" else [],
    extra_link_args=["-pthread"] + (["-ldl"] if sys.platform.startswith("linux") else []) if os.name == "posix" else [],
    optional=True,
)

setup(ext_modules=[native] if os.environ.get("PRUNERECIPE_NO_NATIVE") != "1" else [], cmdclass={"build_ext": optional_build_ext})
