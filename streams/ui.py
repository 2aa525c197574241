"""Terminal output shared by the long-running commands."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


class _Field(ProgressColumn):
    """A task's field by name, empty for a task without it."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get(self.name, "")))


def progress_bar(console: Console) -> Progress:
    """The progress display of every long command: one bar per phase, counts and time."""
    return Progress(
        TextColumn("{task.description:<30}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        # a run's measured rate, ETA and margin to its deadline, when it reports them
        _Field("eta"),
        console=console,
    )
