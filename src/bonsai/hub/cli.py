"""`bonsai models ...`: list, pull, import, verify, remove and describe the models of the local store."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from bonsai.format import CheckpointError, summarize
from bonsai.format.cli import OneLineError, render
from bonsai.format.cli import _size  # one size formatter for every command

from .catalog import ModelEntry
from .errors import HubError
from .pull import pull as pull_model
from .store import Store, default_home


class _ModelsGroup(click.Group):
    """Turns the model manager's errors into one-line messages with exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (HubError, CheckpointError) as exc:
            raise OneLineError(str(exc)) from None


def _status(store: Store, entry: ModelEntry, deep: bool = False) -> str:
    problem = store.problem(entry, deep=deep)
    if problem is not None:
        return problem
    return "built-in" if entry.source == "built-in" else "ok"


@click.group(cls=_ModelsGroup)
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="BONSAI_HOME",
    help="Store folder (default: $BONSAI_HOME, else the user's cache folder).",
)
@click.pass_context
def models(ctx: click.Context, home: Path | None) -> None:
    """Manage the local model store: the built-in model plus pulled and imported checkpoints."""
    ctx.obj = Store(home or default_home())


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@click.pass_obj
def list_models(store: Store, as_json: bool) -> None:
    """List the models with their size, architecture, license and status (no network)."""
    rows = [(entry, _status(store, entry)) for entry in store.all()]
    if as_json:
        doc = [{**dataclasses.asdict(e), "path": str(store.path_of(e)), "status": s} for e, s in rows]
        click.echo(json.dumps(doc, indent=2))
        return
    table = [("MODEL", "SIZE", "ARCHITECTURE", "LICENSE", "STATUS", "SOURCE")]
    table += [(e.ref, _size(e.size), e.architecture, e.license, s, e.source) for e, s in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])


@models.command()
@click.argument("spec")
@click.option("--name", help="Name in the store (default: the checkpoint's own name, else the file name).")
@click.option("--sha256", help="Expected sha256 of the file (else the registry's or a URL.sha256 sidecar's).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_obj
def pull(store: Store, spec: str, name: str | None, sha256: str | None, quiet: bool) -> None:
    """Download SPEC (NAME, http(s) URL or hf:OWNER/REPO/FILE) into the store.

    Interrupted downloads resume where they stopped; the file enters the store only after its
    sha256 and its header have been checked. Names are looked up in $BONSAI_HOME/registry.json.
    """
    result = pull_model(store, spec, name=name, sha256=sha256, progress=not quiet)
    entry = result.entry
    if not result.downloaded:
        click.echo(f"{entry.ref} is already present ({store.path_of(entry)})")
        return
    if not result.verified:
        click.echo(f"warning: no sha256 was published for {spec}; recorded the received file's sha256 {entry.sha256}", err=True)
    click.echo(f"pulled {entry.ref} ({_size(entry.size)}, sha256 {entry.sha256})")


@models.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Name in the store (default: the checkpoint's own name, else the file name).")
@click.option("--link", is_flag=True, help="Hard-link instead of copying (same filesystem only).")
@click.pass_obj
def import_model(store: Store, path: Path, name: str | None, link: bool) -> None:
    """Validate a local checkpoint and add it to the store."""
    entry = store.add(path, f"import:{path.resolve()}", name=name, mode="link" if link else "copy")
    click.echo(f"imported {entry.ref} ({_size(entry.size)}, sha256 {entry.sha256})")


@models.command()
@click.argument("name", required=False)
@click.pass_obj
def verify(store: Store, name: str | None) -> None:
    """Recompute the sha256 of every model (or NAME) and report corrupted or missing files."""
    entries = [store.get(name)] if name else store.all()
    bad = 0
    for entry in entries:
        status = _status(store, entry, deep=True)
        bad += status not in ("ok", "built-in")
        click.echo(f"{entry.ref}: {status}")
    if bad:
        raise OneLineError(f"{bad} of {len(entries)} models failed verification (see above)")


@models.command()
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def rm(store: Store, name: str, yes: bool) -> None:
    """Remove a model's file and catalog entry."""
    entry = store.get(name)
    if not yes:
        click.confirm(f"remove {entry.ref} ({store.path_of(entry)})?", abort=True)
    store.remove(entry.ref)
    click.echo(f"removed {entry.ref}")


@models.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the entry and the checkpoint summary as JSON.")
@click.pass_obj
def info(store: Store, name: str, as_json: bool) -> None:
    """Show a model's catalog entry and a summary of its checkpoint."""
    entry = store.get(name)
    path = store.resolve(entry.ref)
    summary = summarize(path)
    if as_json:
        click.echo(json.dumps({"entry": dataclasses.asdict(entry), "checkpoint": summary}, indent=2))
        return
    for key, value in dataclasses.asdict(entry).items():
        click.echo(f"{key:<16}{value if value not in (None, '') else '-'}")
    click.echo(f"{'path':<16}{path}")
    click.echo("")
    click.echo(render(summary))
