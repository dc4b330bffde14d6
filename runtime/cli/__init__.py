"""The composition root: the `blockpress` command and the embedded single-machine runtime.

The only place that ties gateway, workers and agents together.
"""
