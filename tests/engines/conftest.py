"""Tests against the engines' own packages. They run in .venv-engines
(`.ci/test` runs them there, where they must not skip); in an environment
without an engine its tests are not collected at all."""

from __future__ import annotations

import importlib.util

ENGINES = ("vllm", "sglang", "lmcache")
collect_ignore_glob = [f"test_{e}_*.py" for e in ENGINES if not importlib.util.find_spec(e)]
