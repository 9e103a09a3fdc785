"""Help texts a person reads: no ``<bool>``, ``<list[str]>`` or ``<path>`` type placeholders.

Recent Typer releases print the Python type of every parameter in ``--help``; what a user
needs is the option and a word for its value (``--smtp-port PORT``, ``--allow-private-mx``).
:class:`TidyGroup` (the ``cls`` of the top-level Typer app) gives every command of the tree,
including the built-in ``--help``, such a metavar when its help is shown: flags get none,
options without an explicit one get their own name (``--column COLUMN``), arguments show
only their name.  Nothing else about parsing changes.
"""

from __future__ import annotations

from typing import Any

from typer.core import TyperGroup


def _tidy(param: Any) -> None:
    if getattr(param, "_sounding_tidy", False):
        return
    kind = getattr(param, "param_type_name", "")
    if kind == "argument":
        if param.metavar is None:
            param.metavar = (param.name or "value").upper()
        # the argument's name says it all; the type column stays empty
        param.display_type_rich = lambda ctx=None: None
    elif kind == "option":
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        elif param.metavar is None:
            param.metavar = (param.name or "value").upper()
    param._sounding_tidy = True


def _wrap(cmd: Any) -> Any:
    """Tidy ``cmd``'s parameters (and its subcommands') whenever they are listed."""
    if getattr(cmd, "_sounding_wrapped", False):
        return cmd
    get_params = cmd.get_params

    def tidy_params(ctx: Any) -> list[Any]:
        params = get_params(ctx)
        for p in params:
            _tidy(p)
        return list(params)

    cmd.get_params = tidy_params
    sub = getattr(cmd, "get_command", None)
    if sub is not None and not isinstance(cmd, TidyGroup):
        def tidy_command(ctx: Any, name: str) -> Any:
            c = sub(ctx, name)
            return _wrap(c) if c is not None else None

        cmd.get_command = tidy_command
    cmd._sounding_wrapped = True
    return cmd


class TidyGroup(TyperGroup):
    """The top-level group: every command below it gets readable help (see the module)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for p in params:
            _tidy(p)
        return list(params)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        c = super().get_command(ctx, cmd_name)
        return _wrap(c) if c is not None else None
