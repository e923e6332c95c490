"""Helpers shared by test files (and benchmarks/): test files import from here,
never from each other. ``tests/`` is on ``sys.path`` under pytest (rootdir
conftest); a script outside it adds the directory first."""
