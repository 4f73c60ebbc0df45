"""Tests against the engines' own packages. They run in .venv-engines
(`.ci/test` runs them there, where they must not skip); in an environment
without vLLM they are not collected at all."""

from __future__ import annotations

import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]
