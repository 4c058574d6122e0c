"""``carlzoo``: the click command group.

Each command lives in its own module and imports torch only when it runs, so
``carlzoo --help`` stays fast.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, TextIO

import click

from carlzoo import __version__
from carlzoo.cli.export_cmd import export, push
from carlzoo.cli.probe_cmd import probe
from carlzoo.cli.train_cmd import train
from carlzoo.cli.zoo_cmd import assign, embed, info, list_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="carlzoo")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """carlzoo: CARL encoders: train, evaluate, export and extract embeddings."""
    # carlzoo's progress at INFO; other libraries (e.g. onnxscript's optimiser) only warn.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("carlzoo").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # -v keeps Python's format, with the line that warned
        warnings.showwarning = _one_line_warning


def _one_line_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
    **_: Any,
) -> None:
    """A warning as the command's user needs it: one line, without the source that raised it."""
    click.echo(f"warning: {message}", err=True)


for _command in (list_cmd, info, embed, assign, probe, train, export, push):
    main.add_command(_command)


if __name__ == "__main__":
    main()
