"""Concurrent `pricing set` from separate processes: no corrupt file, no lost edit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mcpbill_cli.errors import PricingInvalid
from mcpbill_cli.pricing import (
    SAMPLE_PRICING,
    PricingSource,
    load_pricing,
    parse_pricing,
    save_pricing_text,
)

EDITS_PER_PROCESS = 50

# Each writer waits for a common start time so that the two really overlap.
WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mcpbill_cli.pricing import edit_pricing, set_price

    path, prefix, start = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))
    for i in range({edits}):
        edit_pricing(path, lambda table, i=i: set_price(table, f"{{prefix}}.{{i}}", i + 1))
""").format(edits=EDITS_PER_PROCESS)


def start_writers(path: Path, prefixes: list[str]) -> list[subprocess.Popen[bytes]]:
    start = time.time() + 1.5  # both interpreters are up by then
    return [subprocess.Popen([sys.executable, "-c", WRITER, str(path), prefix, str(start)],
                             stderr=subprocess.PIPE) for prefix in prefixes]


def finish(writers: list[subprocess.Popen[bytes]]) -> None:
    for writer in writers:
        _, stderr = writer.communicate()
        assert writer.returncode == 0, stderr.decode()


@pytest.mark.slow
def test_two_processes_setting_prices_lose_no_edit(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    start_version = save_pricing_text(path, SAMPLE_PRICING).version
    writers = start_writers(path, ["alpha", "beta"])
    versions = []
    while any(writer.poll() is None for writer in writers):
        versions.append(load_pricing(path).version)  # every read in between parses too
    finish(writers)
    table = load_pricing(path)
    assert table.version == start_version + 2 * EDITS_PER_PROCESS
    for prefix in ("alpha", "beta"):
        for i in range(EDITS_PER_PROCESS):
            assert table.tools[f"{prefix}.{i}"].price == i + 1
    assert versions == sorted(versions)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pricing.toml", "pricing.toml.lock"]


@pytest.mark.slow
def test_a_watching_source_follows_concurrent_edits(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    save_pricing_text(path, SAMPLE_PRICING)
    source = PricingSource(path, check_interval=0)
    writers = start_writers(path, ["alpha", "beta"])
    seen = []
    while any(writer.poll() is None for writer in writers):
        seen.append(source.current().version)
    finish(writers)
    assert source.current().version == 1 + 2 * EDITS_PER_PROCESS
    assert source.last_error is None  # atomic replaces: never a half-written file
    assert seen == sorted(seen)


def test_a_broken_direct_write_is_survived_then_recovered(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    save_pricing_text(path, SAMPLE_PRICING)
    source = PricingSource(path, check_interval=0)
    # What a non-atomic writer leaves behind: the file cut inside a string.
    half = SAMPLE_PRICING[: SAMPLE_PRICING.index('"0.002"') + 3]
    path.write_text(half)
    with pytest.raises(PricingInvalid):
        parse_pricing(half)
    assert source.current().version == 1
    assert isinstance(source.last_error, PricingInvalid)
    path.write_text(SAMPLE_PRICING.replace("version = 1", "version = 2"))
    assert source.current().version == 2
    assert source.last_error is None
