"""Transitional alias: the state helpers live in conftest.py."""
from .conftest import assert_same_state, global_hook_counts, hook_counts, snapshot  # noqa: F401
