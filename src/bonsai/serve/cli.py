"""`bonsai serve`: the web UI and HTTP APIs on one local port."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .hosts import browsable, host_pattern, is_loopback, is_unspecified
from .middleware import allowed_origin_set

# On Ctrl+C or SIGTERM, blocking A1111/OpenAI requests wait this long before they are cut off and
# their jobs are cancelled; without a limit, uvicorn would wait for every job they wait on to finish.
SHUTDOWN_GRACE_S = 5


def _origins(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    try:
        allowed_origin_set(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return values


def _hosts(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        try:
            host_pattern(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return values


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback exposes the server.")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True, help="TCP port to listen on.")
@click.option("--token", envvar="BONSAI_TOKEN", default=None, help="Require this token on every request (env BONSAI_TOKEN).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="History and images (default: $BONSAI_HOME/serve).")
@click.option("--model", "models", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Extra checkpoint file to offer (repeatable); the store's models are always offered.")
@click.option("--default-model", default=None, help="Model used when a request names none (default: the first usable).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True,
              help="Where jobs run (auto: CUDA, else Apple MPS, else CPU).")
@click.option("--max-queue", type=click.IntRange(min=1), default=16, show_default=True, help="Waiting jobs before new ones get 429.")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True, help="Most images one job may ask for.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, callback=_hosts, metavar="NAME",
              help="Name by which clients may reach the server, besides localhost and IP addresses (repeatable; "
              "'*.example.org': the names under it; '*': any). Bound to loopback, the server refuses requests "
              "addressed to any other name, so that no web page can reach it by pointing its own domain at this "
              "machine (DNS rebinding); bound to another address, it accepts any name unless this option is given.")
@click.option("--allowed-origin", "allowed_origins", multiple=True, callback=_origins, metavar="SCHEME://HOST[:PORT]",
              help="Web page origin, besides the server's own, whose browsers may send POSTs (repeatable), "
              "e.g. a reverse proxy's https://bonsai.example.org; '*' allows any.")
def serve(host, port, token, data_dir, models, default_model, device, max_queue, max_batch, allowed_hosts, allowed_origins) -> None:
    """Serve the web UI, the native API, and A1111- and OpenAI-compatible APIs."""
    import uvicorn

    from bonsai.hub import default_home

    from .app import create_app
    from .config import ServeConfig

    if not is_loopback(host) and not token:
        click.echo(f"warning: binding {host} without --token lets anyone who can reach it generate images", err=True)
    config = ServeConfig(
        data_dir=data_dir or default_home() / "serve", models=tuple(models), default_model=default_model, device=device,
        token=token, host=host, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins, max_queue=max_queue,
        max_batch=max_batch,
    )
    click.echo(f"Bonsai on http://{browsable(host)}:{port}/" + ("?token=..." if token else "")
               + (f"  (listening on every address of this machine: {host})" if is_unspecified(host) else "")
               + f"  (data: {config.data_dir})", err=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    uvicorn.run(create_app(config), host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
