"""What an extra installs is enough for what it serves: every package imported by the example
paid server (the demo's server) or by the proxy is declared by mcpbill's core dependencies or
that extra, directly or through them. `make demo` installs only `.[mcp]`: a package missing here
stops the demo's server at import."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

import pytest

# Loaded only where they happen to be installed, never needed: setuptools' `.pth` hook
# (_distutils_hack, in every interpreter of this venv) and uvicorn's reloader (watchfiles).
IMPORTED_WHEN_PRESENT = {"setuptools", "watchfiles"}

# Imports what each face of the extra imports, then prints the modules loaded and their files.
PROBE = """
import json, sys
for module in {modules!r}:
    __import__(module)
print(json.dumps({{name: getattr(module, "__file__", None)
                  for name, module in list(sys.modules.items())}}))
"""


def _used_distributions(loaded: dict[str, str | None]) -> set[str]:
    """The distributions whose files ``loaded`` came from. A namespace package that several
    distributions share (``opentelemetry``: api, sdk...) counts only the parts actually loaded."""
    owners = packages_distributions()
    used: set[str] = set()
    for top in {name.partition(".")[0] for name in loaded}:
        dists = owners.get(top, [])
        if len(dists) <= 1:
            used.update(dists)
            continue
        files = {str(Path(p).resolve()) for p in loaded.values() if p is not None}
        used.update(dist for dist in dists if any(
            str(Path(f.locate()).resolve()) in files
            for f in distribution(dist).files or [] if f.suffix == ".py"))
    return {dist.lower().replace("_", "-") for dist in used}


def _closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, with what they require in turn."""
    seen: set[str] = set()
    pending = list(requirements)
    while pending:
        requirement = pending.pop()
        name, _, marker = requirement.partition(";")
        if "extra" in marker:
            continue
        base = re.split(r"[\s\[<>=!~(]", name.strip(), maxsplit=1)[0].lower().replace("_", "-")
        if base in seen:
            continue
        seen.add(base)
        try:
            pending.extend(distribution(base).requires or [])
        except PackageNotFoundError:
            continue
        extras = re.search(r"\[([^\]]+)\]", name)
        for extra in (extras.group(1).split(",") if extras else []):
            pending.extend(r.partition(";")[0] for r in distribution(base).requires or []
                           if _for_extra(r, extra.strip()))
    return seen


def _for_extra(requirement: str, extra: str) -> bool:
    return re.search(rf"extra\s*==\s*['\"]{re.escape(extra)}['\"]", requirement) is not None


def _declared(extra: str) -> set[str]:
    requires = distribution("mcpbill").requires or []
    core = [r for r in requires if "extra" not in r.partition(";")[2]]
    chosen = [r.partition(";")[0] for r in requires if _for_extra(r, extra)]
    return _closure(core + chosen)


@pytest.mark.parametrize(("extra", "modules"), [
    ("mcp", ["mcpbill_cli.mcp", "mcpbill_cli.demo"]),
    ("proxy", ["mcpbill_cli.proxy.server", "mcpbill_cli.metrics"]),
])
def test_an_extra_declares_every_package_its_code_imports(extra: str, modules: list[str]) -> None:
    probe = subprocess.run([sys.executable, "-c", PROBE.format(modules=modules)],
                           capture_output=True, text=True, check=True, timeout=120)
    loaded = json.loads(probe.stdout)
    declared = _declared(extra) | {"mcpbill"} | IMPORTED_WHEN_PRESENT
    missing = sorted(_used_distributions(loaded) - declared)
    assert missing == [], f"[{extra}] does not install {missing}, which its code imports"
