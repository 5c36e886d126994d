"""Built-in merge methods: importing this package registers each one."""

from splice.merge.methods import task_arithmetic  # noqa: F401
