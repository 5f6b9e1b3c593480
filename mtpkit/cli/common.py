"""What every command shares: the stderr console and turning errors into one line."""

from __future__ import annotations

import functools
import sys
import time

import typer
from rich.console import Console
from rich.progress import Progress

from mtpkit.errors import MtpkitError

console = Console(stderr=True)


def fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def friendly_errors(command):
    """Turn MtpkitError and Ctrl-C into one line on stderr and a non-zero exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MtpkitError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except MemoryError:
            fail("out of memory: try a smaller batch, --max-length or model")

    return wrapper


def not_built(name: str) -> None:
    console.print(f"mtpkit {name} is not built yet", highlight=False)
    sys.stderr.flush()
    raise typer.Exit(2)


def progress_display(*columns, transient: bool = False):
    """A Rich progress bar on a terminal; in a piped log (no terminal redraws there) a plain line whenever the stage
    changes, and at most every ``LogProgress.EVERY`` seconds while it runs, so a log shows how far long work got."""
    if console.is_terminal:
        return Progress(*columns, console=console, transient=transient)
    return LogProgress()


class LogProgress:
    """The part of Rich's ``Progress`` that mtpkit's commands use, written as log lines:
    "[2m 05s] bench: 12/80 (mt-bench 93)"."""

    EVERY = 30.0  # seconds between lines within one stage

    def __init__(self):
        self.console = console
        self._tasks: dict[int, dict] = {}
        self._start = self._last = 0.0

    def __enter__(self):
        self._start = time.monotonic()
        return self

    def __exit__(self, *exc):
        for task in self._tasks.values():
            if task.get("_written") != (task["description"], task["completed"], task["total"]):
                self._write(task)  # where it ended, unless that is the last line written
        return False

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        self._tasks[len(self._tasks)] = {"description": description, "total": total, "completed": 0, **fields}
        return len(self._tasks) - 1

    def update(self, task_id: int, *, description: str | None = None, completed: float | None = None,
               total: float | None = None, advance: float | None = None, **fields) -> None:
        task = self._tasks[task_id]
        stage_changed = description is not None and description != task["description"]
        for key, value in (("description", description), ("completed", completed), ("total", total)):
            if value is not None:
                task[key] = value
        if advance:
            task["completed"] += advance
        task.update(fields)
        now = time.monotonic()
        finished = task["total"] is not None and task["completed"] >= task["total"]
        if stage_changed or finished or now - self._last >= self.EVERY:
            self._write(task)

    def _write(self, task: dict) -> None:
        task["_written"] = (task["description"], task["completed"], task["total"])
        self._last = time.monotonic()
        elapsed = int(self._last - self._start)
        done = f"{task['completed']:.0f}/{task['total']:.0f}" if task["total"] else f"{task['completed']:.0f}"
        info = f" {task['info']}" if task.get("info") else ""
        self.console.print(f"[{elapsed // 60}m {elapsed % 60:02d}s] {task['description']}: {done}{info}",
                           highlight=False, soft_wrap=True)
