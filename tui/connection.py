"""The dashboard's link to the daemon: an event-stream thread and a request helper.

The TUI talks to the daemon only through `devmapd.client` (DESIGN.md "Principles"). Everything
here blocks, so it runs off the UI thread and reports back with Textual messages, which
`post_message` makes safe to send from any thread.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from textual.message import Message

from devmapd.client import Client, DaemonUnavailable, DevmapdError, PermissionDenied  # noqa: F401 (app.py imports the errors from here)


class ClientLike(Protocol):
    """The slice of `devmapd.client.Client` the dashboard uses (a test may hand in its own)."""
    def hello(self) -> dict: ...
    def status(self) -> dict: ...
    def model(self, name: str) -> dict: ...
    def remap(self, name: str, device: str) -> dict: ...
    def pin(self, name: str, device: str) -> dict: ...
    def unpin(self, name: str) -> dict: ...
    def evict(self, name: str) -> dict: ...
    def reload(self, name: str) -> dict: ...
    def events(self, *, reconnect: bool = True) -> Iterator[dict]: ...
    def close(self) -> None: ...


ClientFactory = Callable[[], ClientLike]


def default_factory(socket: str | None, timeout: float = 10.0) -> ClientFactory:
    def make() -> ClientLike:
        return Client(socket, timeout=timeout)
    return make


def error_text(exc: BaseException) -> str:
    """One line for the log and banner; the client's messages already say what to do."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


# -- messages posted to the app ---------------------------------------------------------------

class Connected(Message):
    def __init__(self, hello: dict, status: dict, reconnected: bool) -> None:
        super().__init__()
        self.hello = hello
        self.status = status
        self.reconnected = reconnected


class Unreachable(Message):
    def __init__(self, error: str, retry_in: float, attempt: int) -> None:
        super().__init__()
        self.error = error
        self.retry_in = retry_in
        self.attempt = attempt


class DaemonEvent(Message):
    def __init__(self, event: dict) -> None:
        super().__init__()
        self.event = event


class StatusRefreshed(Message):
    def __init__(self, status: dict) -> None:
        super().__init__()
        self.status = status


# -- the event stream thread ------------------------------------------------------------------

class EventPump:
    """Connect, send the full status, then forward every event; on any loss, say so and retry.

    A plain daemon thread rather than a Textual thread worker: it spends its life blocked in a
    socket read, and a worker thread would hold up the app's exit until the read returns.
    Reconnecting is done here (events(reconnect=False)) so that every (re)connection is followed
    by a fresh full status, which closes the gap of events missed while disconnected.
    """

    BACKOFF = (0.5, 1.0, 2.0, 3.0, 5.0)

    def __init__(self, factory: ClientFactory, post: Callable[[Message], Any],
                 backoff: tuple[float, ...] | None = None) -> None:
        self._factory = factory
        self.backoff = backoff or self.BACKOFF
        self._post = post
        self._stop = threading.Event()
        self._client: ClientLike | None = None
        self._thread = threading.Thread(target=self._run, name="devmapd-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        client = self._client
        if client is not None:
            try:
                client.close()   # wakes the blocked read where the client supports it
            except Exception:
                pass

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        attempt = 0
        connected_once = False
        while not self._stop.is_set():
            error = "connection closed"
            try:
                self._client = client = self._factory()
                hello = client.hello()
                status = client.status()
                if self._stop.is_set():
                    break
                self._post(Connected(hello, status, reconnected=connected_once))
                connected_once = True
                attempt = 0
                for event in client.events(reconnect=False):
                    if self._stop.is_set():
                        return
                    if event.get("type") == "connection":
                        if event.get("state") == "lost":
                            error = event.get("message") or "connection lost"
                            break
                        continue
                    self._post(DaemonEvent(event))
                else:
                    error = "the daemon closed the event stream"
            except Exception as exc:  # any failure means: not connected; say why, then retry
                error = error_text(exc)
            finally:
                client_ref, self._client = self._client, None
                if client_ref is not None:
                    try:
                        client_ref.close()
                    except Exception:
                        pass
            if self._stop.is_set():
                break
            delay = self.backoff[min(attempt, len(self.backoff) - 1)]
            attempt += 1
            self._post(Unreachable(error, delay, attempt))
            self._stop.wait(delay)


class Requests:
    """One lazily (re)opened client for request/reply calls made from worker threads."""

    def __init__(self, factory: ClientFactory) -> None:
        self._factory = factory
        self._client: ClientLike | None = None
        self._lock = threading.Lock()

    def call(self, method: str, *args: Any) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            try:
                return getattr(self._client, method)(*args)
            except (DaemonUnavailable, OSError):
                self._drop()
                raise

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()
