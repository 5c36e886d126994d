"""Build hook for splice's one optional C extension (everything else is in pyproject.toml).

``splice.delta._introselect`` makes the mergekit dialect's torch-sort-order top-k selection
run in compiled code. It is optional: when no C compiler is available the build goes on
without it and splice uses the pure-Python path (`splice.delta.argsort_select`), which
selects the same entries, more slowly.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "splice.delta._introselect",
            ["src/splice/delta/_introselect.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
