"""How the commands write: status lines on stderr, and stdout that behaves as
a Unix filter's (a reader gone ends the command quietly, with SIGPIPE's
status; any other failed write ends it with one line)."""

from __future__ import annotations

import contextlib
import io
import os
import select
import sys
from collections.abc import Callable
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
    """A signal arrived while a write was blocked on a stalled reader."""


# What a shell reports for a program killed by SIGPIPE (128 + 13): `yes | head`
# ends `yes` so. Python ignores SIGPIPE and gets EPIPE instead, so we exit with
# the same status ourselves.
EXIT_READER_GONE = 141


class Output:
    """Buffered stdout, flushed after each batch of events.

    A write that fails ends the command: a reader gone (EPIPE) quietly with
    ``ReaderGone``, anything else (a full disk, ``> /dev/full``) with one
    line. ``failed`` says so; ``on_failure`` (the command's stop) is called
    once. While a write is blocked on a stalled reader, ``interrupt()``
    (called from a SIGINT/SIGTERM handler) abandons it, so that signals
    work whatever the output does.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.closed = False
        self.reader_gone = False
        self.error: OSError | None = None
        self.on_failure: Callable[[], None] | None = None
        self._writing = False

    @property
    def failed(self) -> bool:
        return self.reader_gone or self.error is not None

    def write(self, line: str) -> None:
        if self.closed:
            return
        self._guarded(self.stream.write, line + "\n")

    def flush(self) -> None:
        if self.closed:
            return
        self._guarded(self.stream.flush)

    def _guarded(self, operation: Callable[..., Any], *args: Any) -> None:
        self._writing = True
        try:
            operation(*args)
        except BrokenPipeError:
            self.reader_gone = True
            self._close()
        except OSError as err:
            self.error = err
            self._close()
        except OutputInterrupted:
            self._close()
        finally:
            self._writing = False

    def interrupt(self) -> None:
        """From a signal handler: abandon a write blocked on the reader."""
        if self._writing:
            self._writing = False
            raise OutputInterrupted

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
