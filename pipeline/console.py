"""Terminal output: the rich consoles, progress bars with rates and ETAs, and the one-line error exit."""

import contextlib
import errno
import os

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline.errors import GspError

console = Console()
err_console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Throughput over rich's recent window, e.g. `1,024 tok/s`."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


def progress(unit: str = "tok", *, show: bool = True) -> Progress:
    """A progress bar showing done/total, rate in `unit`/s, elapsed and ETA (`show=False`: silent)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
        disable=not show,
    )


@contextlib.contextmanager
def cli_errors():
    """Every failure ends as one line on stderr and a non-zero exit, never a traceback.

    - GspError: the user's to fix, in their words (exit 1);
    - a full disk, out of memory, a file the system refuses: what to do about it (exit 1);
    - Ctrl-C: how to resume (exit 130);
    - anything else is gsp's bug: one line saying so, with GSP_DEBUG=1 to see the traceback (exit 1).
    """
    try:
        yield
    except GspError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: rerun the same command to resume", highlight=False)
        raise typer.Exit(130) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _fail("disk full: free some space and rerun the same command (a store resumes where it stopped)")
        _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
    except MemoryError:
        _fail("out of memory: lower --batch-size (or --buffer-mib for fit), or use a machine with more memory")
    except typer.Exit:
        raise
    except Exception as e:
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
            _fail("out of GPU memory: lower --batch-size (or the model's size), or use --device cpu")
        if "can't allocate memory" in str(e):  # torch's CPU allocator
            _fail("out of memory: lower --batch-size (or --buffer-mib for fit), or use a machine with more memory")
        if os.environ.get("GSP_DEBUG"):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        _fail(f"internal error ({type(e).__name__}: {first}); this is a bug in gsp: please report it, with "
              "GSP_DEBUG=1 set to see the traceback")  # fmt: skip


def _fail(message: str) -> None:
    # escaped: a message is plain text, and "[nan]" or '.[s3]' in it are not rich markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def warn(msg: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {escape(msg)}", highlight=False, soft_wrap=True)


def info(msg: str) -> None:
    err_console.print(msg, highlight=False, soft_wrap=True)
