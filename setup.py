"""Build hook for splice's optional C extensions (everything else is in pyproject.toml).

- ``splice.delta._introselect``: the mergekit dialect's torch-sort-order top-k selection
  (`splice.delta.argsort_select`);
- ``splice.delta._radix_kernel``: the radix selection's histograms and keep rule
  (`splice.delta.topk.radix_histogram`, `splice.merge.sparsify.keep_rule_trim_`);
- ``splice.merge.methods._ties_kernel``: the float32 TIES sign election and disjoint merge
  in one pass (`splice.merge.methods._common.ties_combine_`), and the float32 linear
  combine of task arithmetic (`linear_combine_`);
- ``splice.merge.methods._mergekit_kernel``: the float32 elementwise steps of the mergekit
  dialect's Model Stock and SLERP (`splice.merge.methods._mergekit_precision`);
- ``splice.merge.methods._dare_kernel``: DARE's random drop with torch's own Bernoulli
  draws (`splice.merge.methods.dare`).

All are optional: when no C compiler is available the build goes on without them and
splice uses its pure-Python paths, which give the same tensors, more slowly. No fused
multiply-add (-ffp-contract=off): every operation rounds once, as torch's do.
"""

from setuptools import Extension, setup

FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math"]
# The TIES kernel's loops select between values computed on both sides: without traps
# assumed the compiler vectorizes them (4-5x here); no value changes (see the .c file).
TIES_FLAGS = [*FLAGS, "-fno-trapping-math"]
# The AVX2 + baseline clones macro both kernels include (listed so an sdist carries it).
CLONES_HEADER = "src/splice/merge/methods/_vector_clones.h"

setup(
    ext_modules=[
        Extension(
            "splice.delta._introselect",
            ["src/splice/delta/_introselect.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "splice.delta._radix_kernel",
            ["src/splice/delta/_radix_kernel.c"],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "splice.merge.methods._ties_kernel",
            ["src/splice/merge/methods/_ties_kernel.c"],
            depends=[CLONES_HEADER],
            extra_compile_args=TIES_FLAGS,
            optional=True,
        ),
        Extension(
            "splice.merge.methods._mergekit_kernel",
            ["src/splice/merge/methods/_mergekit_kernel.c"],
            depends=[CLONES_HEADER],
            extra_compile_args=FLAGS,
            optional=True,
        ),
        Extension(
            "splice.merge.methods._dare_kernel",
            ["src/splice/merge/methods/_dare_kernel.c"],
            depends=[CLONES_HEADER],
            extra_compile_args=FLAGS,
            optional=True,
        ),
    ]
)
