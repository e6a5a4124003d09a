"""Arrows point one way (CONTRIBUTING.md): index -> nothing of ours; tiers -> index;
cacheservice -> index, tiers; connectors -> the client side of cacheservice (client, wire
protocol, frames, errors, results, arena mapping, token lookup) and the hashing. Checked on every
import statement of every module, and on what importing the client really loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OURS = ("index", "tiers", "cacheservice", "connectors")
CLIENT_SIDE = {
    "cacheservice", "cacheservice.client", "cacheservice.aclient", "cacheservice.calls",
    "cacheservice.protocol", "cacheservice.errors", "cacheservice.results",
    "cacheservice.arena", "cacheservice.tokens", "cacheservice.frames", "index.hashing",
    "index.chunks", "tiers.base",
    "index.planner",
}  # fmt: skip
ALLOWED = {
    "index": lambda m: m.startswith("index"),
    "tiers": lambda m: m.startswith(("tiers", "index")),
    "cacheservice": lambda m: m.startswith(("cacheservice", "index", "tiers")),
    "connectors": lambda m: m.startswith("connectors") or m in CLIENT_SIDE,
}


def imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
    return [m for m in out if m.split(".")[0] in OURS]


def test_every_import_points_down() -> None:
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            client_side = module in CLIENT_SIDE or module.removesuffix(".__init__") in CLIENT_SIDE
            for target in imports(path):
                ok = allowed(target)
                if client_side:
                    ok = target in CLIENT_SIDE
                if not ok:
                    wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_client_loads_no_server_code() -> None:
    probe = (
        "import sys, cacheservice.client, cacheservice.arena; "
        "print(sorted(m for m in sys.modules if m.startswith(('aiohttp', 'tiers.host', "
        "'tiers.stack', 'tiers.disk', 'cacheservice.service', 'cacheservice.server', "
        "'cacheservice.leases', 'index.radix'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
