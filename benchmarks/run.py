"""Run every benchmark in one process tree and write benchmarks/RESULTS.md.

Each benchmark module is a `python -m benchmarks.<name>` script printing result lines of the form
`ratio <name> <value>` or `count <name> <value>` (ratios are measured within one run, so they
compare like with like on whatever machine runs them). This runner collects them, prints them
one per line, and overwrites RESULTS.md with the machine, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

from xfusion.io import atomic_write_text

BENCHMARKS = ("flops", "step_time", "sampling", "vae_calls", "zero_buckets", "pretrain_threads")
HERE = Path(__file__).resolve().parent


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()} — {cpu}, {os.cpu_count()} cores, {gpu}; python "
            f"{platform.python_version()}, torch {torch.__version__}")


def run_one(name: str) -> tuple[list[str], str]:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}"], capture_output=True,
                          text=True, cwd=HERE.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("ratio ", "count ", "value "))]
    notes = [ln for ln in proc.stdout.splitlines() if ln.startswith("# ")]
    if proc.returncode != 0:
        notes.append(f"# benchmarks.{name} failed (exit {proc.returncode}): "
                     + (proc.stderr.strip().splitlines() or ["no stderr"])[-1])
    return lines, "\n".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=BENCHMARKS, default=list(BENCHMARKS))
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = parser.parse_args()

    sections, failed = [], False
    for name in args.only:
        lines, notes = run_one(name)
        failed |= "failed (exit" in notes
        for line in lines:
            print(line, flush=True)
        body = "\n".join(lines) or "(no result lines)"
        sections.append(f"## {name}\n\n```\n{body}\n```\n" + (f"\n{notes}\n" if notes else ""))
    header = (f"# Benchmark results\n\nMachine: {machine()}  \n"
              f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}  \n"
              f"Command: `make bench` (`python -m benchmarks.run`)\n\n"
              "Overwritten on every run. Each ratio is measured within one run.\n\n")
    atomic_write_text(args.out, header + "\n".join(sections))
    print(f"# wrote {args.out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
