"""Run the benchmarks and print one table of their headline figures.

    python -m benchmarks.run [--quick] [--only NAME ...]

Each benchmark is a module ``benchmarks/NAME.py`` with ``main(quick: bool) -> dict`` that
writes ``results/NAME.json`` (and its plots) and returns a payload whose ``"headline"`` key
holds rows ``{"name": str, "value": number | str | None, "target": number | str | None,
"met": bool | None}`` (``"unit"`` optional); see benchmarks/README.md. A module that does
not exist yet is skipped with a message; one that fails is reported and the others still
run (the exit status is then 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from typing import Any

from benchmarks.common import RESULTS

BENCHMARKS = ("sampling_speed", "accuracy", "objectives", "finetune_ruler", "amortise", "smc")


def load(name: str) -> Any | None:
    """The benchmark module, or None when it does not exist (yet)."""
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"benchmarks.{name}":
            return None
        raise  # the module exists but one of its own imports is missing


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        text = f"{value:,}"
    elif isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def table(outcomes: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    out = Table(title="kldsl benchmarks: headline figures", title_justify="left")
    for column, justify in (
        ("benchmark", "left"),
        ("figure", "left"),
        ("value", "right"),
        ("target", "right"),
        ("met", "center"),
    ):
        out.add_column(column, justify=justify)
    for o in outcomes:
        name = f"{o['name']}\n[dim]{o['status']}[/dim]"
        rows = o.get("headline") or []
        if not rows:
            note = {
                "skipped": "module not found",
                "failed": o.get("error", "failed"),
            }.get(o["status"], "no headline rows; see its JSON")
            out.add_row(name, f"[dim]{note}[/dim]", "", "", "")
        for i, row in enumerate(rows):
            met = row.get("met")
            mark = "—" if met is None else ("[green]✓[/green]" if met else "[red]✗[/red]")
            out.add_row(
                name if i == 0 else "",
                str(row.get("name", "?")),
                fmt(row.get("value"), row.get("unit", "")),
                fmt(row.get("target")),
                mark,
            )
        out.add_section()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small settings (minutes, not tens)")
    parser.add_argument(
        "--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=f"any of {BENCHMARKS}"
    )
    args = parser.parse_args(argv)
    outcomes: list[dict[str, Any]] = []
    for name in args.only or BENCHMARKS:
        module = load(name)
        if module is None:
            print(f"[{name}] skipped: benchmarks/{name}.py does not exist", flush=True)
            outcomes.append({"name": name, "status": "skipped"})
            continue
        print(f"[{name}] running{' (quick)' if args.quick else ''} ...", flush=True)
        start = time.perf_counter()
        try:
            payload = module.main(quick=args.quick)
        except Exception as err:
            traceback.print_exc()
            outcomes.append(
                {"name": name, "status": "failed", "error": f"{type(err).__name__}: {err}"[:100]}
            )
            continue
        seconds = time.perf_counter() - start
        print(f"[{name}] done in {seconds:.0f} s", flush=True)
        outcomes.append(
            {
                "name": name,
                "status": f"{seconds:.0f} s",
                "headline": (payload or {}).get("headline", []),
            }
        )
    from rich.console import Console

    # piped output (make, CI) gets a wide table instead of rich's 80-column default
    console = Console() if sys.stdout.isatty() else Console(width=120)
    console.print(table(outcomes))
    console.print(f"JSON and plots: {RESULTS}")
    return 1 if any(o["status"] == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
