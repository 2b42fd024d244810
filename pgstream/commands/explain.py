"""``pgstream explain MODULE:APP``: per sink path, whether it runs in SQL (pushdown) or in
Python, and why (the step that keeps it in Python)."""

from __future__ import annotations

import json

import click


@click.command("explain")
@click.argument("target", metavar="MODULE:APP")
@click.option("--sql", "show_sql", is_flag=True, help="Print each pushed-down statement too.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def command(target: str, show_sql: bool, as_json: bool) -> None:
    """Print, per sink path of MODULE:APP, whether its batches run as one SQL statement
    (pushed down: a TableSource path of column expressions, key_by on columns or expressions,
    built-in aggregates, tumbling windows on a column) or in Python, and why. Needs no
    database."""
    from pgstream.loader import load_app
    from pgstream.runtime.pushdown import explain_app

    reports = explain_app(load_app(target))
    if as_json:
        click.echo(json.dumps([_as_dict(r) for r in reports], indent=2))
        return
    if not reports:
        click.echo("no sink paths")
        return
    width = max(len(f"{r.stream} -> {r.target}") for r in reports)
    for r in reports:
        path = f"{r.stream} -> {r.target}"
        click.echo(f"{path:<{width}}  {r.runs:<6}  {r.why}")
        if show_sql and r.statement:
            click.echo(f"    {r.statement}")


def _as_dict(report: object) -> dict[str, object]:
    import dataclasses

    assert dataclasses.is_dataclass(report) and not isinstance(report, type)
    return dataclasses.asdict(report)
