"""CLI start-up against its floor, measured in the same run.

Prints the median wall time of `mcpbill --help` and of `mcpbill token issue` divided by the
median of `python -c "import typer, rich, jwt, sqlalchemy"` (target: at most 1.3 each). The
three commands run in turn, round after round, so a busy machine slows all three alike.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = int(os.environ.get("BENCH_RUNS", "15"))
BASELINE = [sys.executable, "-c", "import typer, rich, jwt, sqlalchemy"]
MCPBILL = [sys.executable, "-m", "mcpbill_cli"]


def medians(commands: list[list[str]], env: dict[str, str]) -> list[float]:
    """The median wall time of each command, run in turn ``RUNS`` times."""
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(RUNS):
        for argv, taken in zip(commands, times, strict=True):
            start = time.perf_counter()
            subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            taken.append(time.perf_counter() - start)
    return [statistics.median(taken) for taken in times]


def main() -> None:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "MCPBILL_HOME": home, "NO_COLOR": "1"}
        env.pop("MCPBILL_DB_URL", None)
        for setup in (["init"], ["wallet", "fund", "--demo", "1000"]):
            subprocess.run([*MCPBILL, *setup], env=env, check=True, capture_output=True)
        baseline, helped, issued = medians(
            [BASELINE, [*MCPBILL, "--help"], [*MCPBILL, "token", "issue", "--limit", "0.01"]],
            env)
    print(f"baseline  import typer, rich, jwt, sqlalchemy   {baseline * 1000:7.1f} ms")
    print(f"mcpbill --help                                  {helped * 1000:7.1f} ms  "
          f"ratio {helped / baseline:.2f}  (target <= 1.3)")
    print(f"mcpbill token issue                             {issued * 1000:7.1f} ms  "
          f"ratio {issued / baseline:.2f}  (target <= 1.3)")
    print(f"({RUNS} runs each, medians; {Path(sys.executable).name} {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
