"""How the commands write: status lines on stderr, and stdout that behaves as
a Unix filter's (a reader gone ends the command quietly, with SIGPIPE's
status; any other failed write ends it with one line)."""

from __future__ import annotations

import contextlib
import io
import os
import select
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO

import click

from ..errors import UserError

PROG = "tcptrace-ebpf"


def notice(message: str) -> None:
    """A status line on stderr (tests and scripts wait for some of them)."""
    click.echo(f"{PROG}: {message}", err=True)


class ReaderGone(Exception):
    """Our stdout's reader went away (EPIPE): end quietly, as Unix filters do."""


class OutputInterrupted(Exception):
    """The command was stopped while a write stayed blocked on a stalled reader."""


# What a shell reports for a program killed by SIGPIPE (128 + 13): `yes | head`
# ends `yes` so. Python ignores SIGPIPE and gets EPIPE instead, so we exit with
# the same status ourselves.
EXIT_READER_GONE = 141

# Once stopped, a write that stays blocked this long means the reader has
# stalled: the output is given up (and the summary says so).
STALLED_READER_S = 0.5


class Output:
    """Buffered stdout, flushed after each batch of events.

    A write that fails ends the command: a reader gone (EPIPE) quietly with
    ``ReaderGone``, anything else (a full disk, ``> /dev/full``) with one
    line. ``failed`` says so; ``on_failure`` (the command's stop) is called
    once. Once the command is stopped (``interrupt()``, called from its
    SIGINT/SIGTERM handler) the output is still written while the reader
    takes it: a slow reader (a busy or emulated machine) gets every line.
    Only a write that stays blocked for ``STALLED_READER_S`` is given up,
    so that signals work whatever the reader does; what was not written
    then is counted (``stop_note()``), never dropped silently.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.closed = False
        self.reader_gone = False
        self.error: OSError | None = None
        self.on_failure: Callable[[], None] | None = None
        self._writing = False
        # Writes finished, and (that count, writing) at the last check of a
        # stopped command's reader: the same write still blocked is a stall.
        self._writes_done = 0
        self._last_check: tuple[int, bool] | None = None
        self.stalled = False
        self._lines_unflushed = 0
        self.lines_not_written = 0
        self._previous_alarm: Any = signal.SIG_DFL

    @property
    def failed(self) -> bool:
        return self.reader_gone or self.error is not None

    def write(self, line: str) -> None:
        if self.closed:
            if self.stalled:
                self.lines_not_written += 1
            return
        self._lines_unflushed += 1
        self._guarded(self.stream.write, line + "\n")

    def flush(self) -> None:
        if self.closed:
            return
        self._guarded(self.stream.flush)
        if not self.closed:
            self._lines_unflushed = 0

    def _guarded(self, operation: Callable[..., Any], *args: Any) -> None:
        try:
            self._writing = True
            try:
                operation(*args)
            finally:
                self._writing = False
            self._writes_done += 1
        except BrokenPipeError:
            self.reader_gone = True
            self._close()
        except OSError as err:
            self.error = err
            self._close()
        except OutputInterrupted:
            self.stalled = True
            # Lines since the last flush may or may not have left.
            self.lines_not_written += self._lines_unflushed
            self._close()

    def interrupt(self) -> None:
        """From a signal handler (the command is stopping): from now on, give
        up a write that stays blocked on the reader for STALLED_READER_S."""
        if self._last_check is not None or self.closed:
            return
        self._last_check = (self._writes_done, self._writing)
        self._previous_alarm = signal.signal(signal.SIGALRM, self._check_reader)
        signal.setitimer(signal.ITIMER_REAL, STALLED_READER_S, STALLED_READER_S)

    def _check_reader(self, _signum: int, _frame: FrameType | None) -> None:
        """SIGALRM, every STALLED_READER_S once stopping: the same write
        blocked since the last check means the reader took nothing meanwhile."""
        now = (self._writes_done, self._writing)
        if self._writing and now == self._last_check:
            self._writing = False
            raise OutputInterrupted
        self._last_check = now

    def stop_note(self) -> str:
        """After the command stopped: stop checking the reader, and say what
        was not written because it stalled ('' when everything was)."""
        if self._last_check is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous_alarm)
        if not self.stalled:
            return ""
        return (
            f"; output given up (the reader took nothing for {STALLED_READER_S:g} s): "
            f"up to {self.lines_not_written} lines not written"
        )

    def watch_reader(self) -> None:
        """Notice a reader that went away even when there is nothing to write."""
        if self.closed:
            return
        try:
            poller = select.poll()
            poller.register(self.stream.fileno(), 0)  # POLLERR and POLLHUP are always reported
            events = poller.poll(0)
        except (OSError, ValueError, io.UnsupportedOperation):
            return
        if any(mask & select.POLLERR for _fd, mask in events):
            # On a pipe's write end, POLLERR means its read end is closed.
            self.reader_gone = True
            self._close()

    def _close(self) -> None:
        self.closed = True
        # What is still buffered would be flushed (and fail again, or block
        # on the stalled reader) at interpreter exit: send it nowhere.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        if self.on_failure is not None:
            self.on_failure()

    def raise_failure(self) -> None:
        """After the command stopped: how it ends."""
        if self.reader_gone:
            raise ReaderGone
        if self.error is not None:
            raise UserError(
                f"cannot write the output: {self.error.strerror or self.error}", exit_code=1
            )
