"""Options shared by every `mesh` verb."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from identity.store import MeshHome

F = TypeVar("F", bound=Callable[..., Any])


def home_option(f: F) -> F:
    """``--home DIR`` on a subcommand (it also works before the verb, on the group)."""
    return click.option(
        "--home", "home_path", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="The mesh home (default: $MESH_HOME, else ~/.micromesh).")(f)


def home_of(ctx: click.Context, home_path: Path | None) -> MeshHome:
    """A subcommand's --home wins over the group's, which wins over $MESH_HOME."""
    if home_path is not None:
        return MeshHome(home_path.expanduser())
    parent = ctx.find_object(MeshHome)
    return parent if parent is not None else MeshHome()
