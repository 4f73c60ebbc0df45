"""Imports go downward only: every module's imports (read with ``ast``, so
lazy imports inside functions count too) name its own layer or a lower one.

    python -m pytest tests/test_layers.py   # the command docs/architecture.md names
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# lowest first; a module belongs to the first layer whose prefix it starts with
CORE = "buffers checksum layout keys allocator eviction tiers stats store directory_url config"
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaf", tuple(f"kvstore.{m}" for m in ["errors", "units", "tier", "proto", "version"])),
    ("transfer and native", ("transfer", "native")),
    ("core", tuple(f"kvstore.{m}" for m in CORE.split())),
    (
        "node and cluster",
        ("kvstore.wire", "kvstore.rpc", "kvstore.dataport", "kvstore.node", "kvstore.cluster"),
    ),
    ("tools", ("kvstore.tools", "kvstore.__main__")),
    ("client", ("client",)),
    ("bench", ("bench",)),
]
# what a lower layer may still import from a higher one: the one vocabulary of errors
ALLOWED = {("transfer and native", "kvstore.errors")}


def layer_of(module: str) -> int | None:
    if module == "kvstore":  # the package's own names: the top of kvstore
        return 4
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def upward_imports() -> list[str]:
    bad = []
    for top in ("kvstore", "transfer", "native", "client", "bench"):
        for path in sorted((ROOT / top).rglob("*.py")):
            me = module_name(path)
            mine = layer_of(me)
            assert mine is not None, f"{me} is in no layer: add it to tests/test_layers.py"
            for target in imports_of(path):
                theirs = layer_of(target)
                if theirs is None or theirs <= mine:
                    continue
                if (LAYERS[mine][0], target) in ALLOWED:
                    continue
                bad.append(f"{me} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    return bad


def test_imports_only_go_downward() -> None:
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from kvstore.node.service import KVStoreService\n")
    assert "kvstore.node.service" in imports_of(probe)
    assert layer_of("kvstore.store.space") < layer_of("kvstore.node.service")  # type: ignore[operator]
    assert layer_of("kvstore.tier") == 0 and layer_of("client.engines.vllm") == 5
