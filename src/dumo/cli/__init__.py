"""The ``dumo`` command line: train, sample, eval, demo, ...

Problems with the user's input end in one line on stderr (``dumo: error: ...``) and exit
status 2; ``--debug`` shows the traceback instead.

Each command is a module here with ``add_parser(subparsers)`` and ``run(args) -> int``; this module
assembles them and is the boundary that turns dumo's errors into that one line.
"""

from __future__ import annotations

import argparse
import sys

from dumo.cli import (
    demo,
    encode,
    export,
    fid,
    grid,
    info,
    plan,
    sample,
    shapes,
    snapshots,
    train,
    trajectories,
)
from dumo.cli import eval as evaluate
from dumo.cli.common import Parser
from dumo.errors import DumoError
from dumo.version import __version__

EXIT_USAGE = 2
#: the command modules, in the order ``dumo --help`` lists their commands
COMMANDS = (train, sample, evaluate, fid, trajectories, grid, encode, info, plan, snapshots, export, demo, shapes)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dumo",
        description="Duality Models (DuMo) and baselines for one- and few-step generation.",
    )
    parser.add_argument("--version", action="version", version=f"dumo {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    for stream in (sys.stdout, sys.stderr):
        # an ASCII-only terminal or pipe (LANG=C) must not turn "±" into a crash after the work is done
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        return args.handler(args)
    except DumoError as error:
        if debug:
            raise
        print(f"dumo: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as error:
        # the allocator's "not enough memory" (CPU) / "out of memory" (CUDA) for a size the user chose
        text = str(error)
        if debug or not (isinstance(error, MemoryError) or "not enough memory" in text or "out of memory" in text):
            raise
        first = text.strip().splitlines()[0] if text.strip() else "allocation failed"
        print(
            f"dumo: error: out of memory ({first}); lower data.batch_size, --batch-size or -n",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dumo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as error:
        # a full disk in a write that does not name its file itself (a log, a library's own files)
        from dumo.files import DISK_FULL_ERRNOS

        if debug or error.errno not in DISK_FULL_ERRNOS:
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(f"dumo: error: {DISK_FULL_ERRNOS[error.errno]}{where}; free some space and run again", file=sys.stderr)
        return EXIT_USAGE
