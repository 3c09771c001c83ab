"""The `bonsai` command line: a thin layer that parses, calls the library and presents.

Subcommands live beside the code they drive and are imported only when used, so that
`bonsai --help` and every command start fast."""

from __future__ import annotations

import importlib
import warnings

import click

# name -> "module:attribute" of a click command or group
SUBCOMMANDS: dict[str, str] = {
    "data": "bonsai.data.cli:data",
    "generate": "bonsai.cli_generate:generate",
    "info": "bonsai.format.cli:info",
    "models": "bonsai.hub.cli:models",
    "serve": "bonsai.serve.cli:serve",
    "quantize": "bonsai.convert.cli:quantize",
    "distill": "bonsai.train.distill_cli:distill",
    "train-lora": "bonsai.train.lora_cli:train_lora_cmd",
    "eval": "bonsai.eval.cli:eval_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = SUBCOMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line: at the command line the Python source line that raised it says nothing."""
    return f"warning: {message}\n"


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bonsai-diffusion")
def main() -> None:
    """Bonsai: local text-to-image generation with 1-bit diffusion models."""
    warnings.formatwarning = one_line_warning


if __name__ == "__main__":
    main()
