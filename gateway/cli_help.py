"""How every ``pneumo`` command is declared, so that its ``--help`` says what it does, which
options it takes and how it is used, and so that ``--config`` works before or after the command.

argparse leaves both to each ``add_parser`` call: a sub-command without ``description`` prints
a bare usage line, and an option of the top-level parser is unknown after the command name
(``pneumo instances --config x.toml`` was "unrecognized arguments").
"""

from __future__ import annotations

import argparse
import getpass
import os
from pathlib import Path
from typing import Any

CONFIG_HELP = "TOML settings file (default: $PNEUMO_CONFIG, else ./pneumo.toml if present, else built-in defaults)"


def add_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    *,
    summary: str | None,
    description: str,
    examples: list[str],
) -> argparse.ArgumentParser:
    """A sub-command whose help has a description and examples. *summary* is its line in the
    parent's command list; None hides it there (not ``help=argparse.SUPPRESS``, which argparse
    prints as ``==SUPPRESS==``)."""
    kwargs: dict[str, Any] = {} if summary is None else {"help": summary}
    return subparsers.add_parser(
        name,
        description=description,
        epilog="example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join(f"  {e}" for e in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


def default_config() -> Path | None:
    """``$PNEUMO_CONFIG`` when set (the top-level default of ``--config``)."""
    value = os.environ.get("PNEUMO_CONFIG")
    return Path(value) if value else None


def accept_config_everywhere(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` to every sub-command parser below *parser* (recursively).

    Their default is SUPPRESS, so a sub-command without the option leaves the top-level value
    (``--config`` before the command, or ``$PNEUMO_CONFIG``) in place; given after the command,
    it wins.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in {id(p): p for p in action.choices.values()}.values():
                if not any("--config" in a.option_strings for a in sub._actions):
                    sub.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="PATH", help=CONFIG_HELP)
                accept_config_everywhere(sub)


def command_parsers(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every command path (``("deliveries", "list")``) and its parser, leaves and groups alike."""
    found: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[(*prefix, name)] = sub
                found.update(command_parsers(sub, (*prefix, name)))
    return found


def operator_name() -> str | None:
    """The OS user running an operator command, for its audit record (the Application Launcher
    of PS3.15 A.5.3.1); None where there is none (some containers have no passwd entry)."""
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - getpass raises OSError or KeyError depending on the platform
        return None
