"""Terminal output: the rich consoles, progress with rates and ETAs, and the one-line error exit.

At a terminal rich draws live bars and wraps text to the window. In a file or a pipe (`gsp run > log
2>&1`) nothing is redrawn: a line is as long as its text (a path is never broken at column 80), and
each progress task prints a plain line every $GSP_PROGRESS_SECONDS seconds (default 30) and one when
it ends:

    harvest: 122,880/491,520 tok (25%) · 652 tok/s · elapsed 0:03:08 · ETA 0:09:25
    harvest: 491,520/491,520 tok (100%) · 650 tok/s · done in 0:12:36
"""

import contextlib
import datetime
import errno
import math
import os
import threading

import rich.progress
import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline.errors import GspError

UNWRAPPED = 10_000  # the width of a file or a pipe: longer than any line gsp prints
PROGRESS_SECONDS = 30.0  # between two progress lines in a log, unless $GSP_PROGRESS_SECONDS says otherwise


class _Console(Console):
    """rich's Console, except that in a file or a pipe a line is as long as its text: rich would
    otherwise take 80 columns (or the width of a terminal that stdin happens to be) and break a
    message, mid-word in a path. Tables are drawn at their natural width."""

    @property
    def size(self) -> ConsoleDimensions:
        if self.is_terminal:  # asked at each print: a test runner swaps sys.stdout and sys.stderr
            return super().size
        return ConsoleDimensions(UNWRAPPED, super().size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


console = _Console()
err_console = _Console(stderr=True)


class RateColumn(ProgressColumn):
    """Throughput over rich's recent window, e.g. `1,024 tok/s`."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


def progress(unit: str = "tok", *, show: bool = True, fields: tuple[str, ...] = ()) -> rich.progress.Progress:
    """Progress of long steps, counted in `unit`: rich's Progress (`add_task`, `advance`, `update`).

    At a terminal, live bars with done/total, percentage, rate, elapsed time and ETA; in a file or a
    pipe, plain lines (`LogProgress`). `fields` names per-task text shown after the ETA (given to
    `add_task` and `update` as keywords, e.g. fit's running `metrics`); the terminal's bar then leaves
    out the percentage, rate and elapsed time to stay on one line. `show=False` (every process of a
    torchrun but the first): silent.
    """
    if show and not err_console.is_terminal:
        return LogProgress(unit, fields, every=progress_seconds())
    extra = [TextColumn(f"{{task.fields[{name}]}}") for name in fields]
    if fields:
        columns = [MofNCompleteColumn(), TextColumn(f"{unit} · ETA"), TimeRemainingColumn(), *extra]
    else:
        columns = [MofNCompleteColumn(), TaskProgressColumn(), RateColumn(unit), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn()]  # fmt: skip
    return rich.progress.Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), *columns, console=err_console, disable=not show
    )


def progress_seconds() -> float:
    """Seconds between two progress lines in a log: $GSP_PROGRESS_SECONDS, or 30."""
    text = os.environ.get("GSP_PROGRESS_SECONDS", "")
    if not text.strip():
        return PROGRESS_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise GspError(f"GSP_PROGRESS_SECONDS is {text!r}: give the seconds between two progress lines in a log, "
                       f"e.g. {PROGRESS_SECONDS:g}")  # fmt: skip
    return seconds


class LogProgress(rich.progress.Progress):
    """rich's Progress for a file or a pipe: instead of a bar redrawn in place, which a log would show
    only when it ends, a thread prints one line for each running task every `every` seconds (its rate
    and ETA over the time since its previous line, or since the start when it did nothing in between),
    and a last line when the task ends: at its total,
    or where the loop stopped (an error, Ctrl-C, a corpus that ran out)."""

    def __init__(self, unit: str, fields: tuple[str, ...] = (), *, every: float):
        super().__init__(console=err_console, disable=True)  # tasks and times are kept; nothing is drawn
        self.unit, self.fields, self.every = unit, fields, every
        self._since: dict[TaskID, tuple[float, float]] = {}  # task -> (time, completed) when it was added
        self._last: dict[TaskID, tuple[float, float]] = {}  # ... at its last line
        self._ended: set[TaskID] = set()  # tasks whose last line is printed
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields) -> TaskID:  # fmt: skip
        with self._lock:  # the thread never sees a task without its times
            task = super().add_task(description, start, total, completed, visible, **fields)
            self._since[task] = self._last[task] = (self.get_time(), completed)
        return task

    def start(self) -> None:
        super().start()
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._tick, name="gsp-progress", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping.set()
            self._thread.join()
            self._thread = None
        self._print(final=True)
        super().stop()

    def _tick(self) -> None:
        while not self._stopping.wait(self.every):
            self._print(final=False)

    def _print(self, final: bool) -> None:
        with self._lock:  # rich's: a task is read whole, never half-updated by the loop
            lines = [self._line(t, final or t.finished) for t in self.tasks if t.visible and t.id not in self._ended]
        for line in lines:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def _line(self, task: rich.progress.Task, ended: bool) -> str:
        """`desc: done/total unit (pct%) · rate · elapsed … · ETA …[ · fields]`; at the end, the mean
        rate and `done in` (or `stopped after`)."""
        now, done = self.get_time(), task.completed
        if task.finished and task.start_time is not None:
            now = task.start_time + task.finished_time  # when it reached its total, not when this line is printed
        t0, c0 = self._since[task.id] if ended else self._last[task.id]
        self._last[task.id] = (now, done)
        rate = (done - c0) / (now - t0) if now > t0 else 0.0
        if rate <= 0:  # nothing done since the last line (a slow batch): the mean rate since the start
            t0, c0 = self._since[task.id]
            rate = (done - c0) / (now - t0) if now > t0 else 0.0
        parts = [f"{task.description}: {done:,.0f}"]
        if task.total is not None:
            parts[0] += f"/{task.total:,.0f} {self.unit} ({_percent(done, task.total)})"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{_number(rate)} {self.unit}/s" if rate > 0 else f"- {self.unit}/s")
        elapsed = _clock(now - self._since[task.id][0])
        if ended:
            self._ended.add(task.id)
            parts.append(f"done in {elapsed}" if task.finished else f"stopped after {elapsed}")
        else:
            left = None if task.total is None else task.total - done
            parts.append(f"elapsed {elapsed}")
            if left is not None:
                parts.append(f"ETA {_clock(left / rate)}" if rate > 0 else "ETA -")
        parts += [str(task.fields[name]) for name in self.fields if task.fields.get(name)]
        return " · ".join(parts)


def _percent(done: float, total: float) -> str:
    return f"{math.floor(100 * done / total) if total > 0 else 100}%"  # floored: 100% means done


def _number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


@contextlib.contextmanager
def status(message: str):
    """A wait without a count (loading a model): a spinner at a terminal, the message as one line in a log."""
    if err_console.is_terminal:
        with err_console.status(message):
            yield
    else:
        info(message)
        yield


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
