"""Terminal output: the rich consoles, progress bars with rates and ETAs, and the one-line error exit."""

import contextlib
import errno

import typer
from rich.console import Console
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
    """Turn the failures a user can cause into one line on stderr and exit code 1 (no traceback)."""
    try:
        yield
    except GspError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]: rerun the same command to resume", highlight=False)
        raise typer.Exit(130) from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            msg = "disk full: free some space and rerun the same command (a store resumes where it stopped)"
        else:
            msg = f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
        err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def warn(msg: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


def info(msg: str) -> None:
    err_console.print(msg, highlight=False, soft_wrap=True)
