"""Built-in merge methods: importing this package registers each one."""

from splice.merge.methods import (  # noqa: F401
    breadcrumbs,
    dare,
    linear,
    magnitude_prune,
    model_stock,
    passthrough,
    slerp,
    task_arithmetic,
    ties,
)
