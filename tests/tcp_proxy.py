"""A threaded TCP proxy in front of PostgreSQL that can lose one COMMIT's reply.

It forwards every connection between its clients and the server, reading both
directions as PostgreSQL protocol messages (a type byte and a length), so it can act on
whole messages. SSL and GSSAPI encryption requests are answered "no" by the proxy
itself: the traffic stays plain text for it to read, whatever the client's sslmode.

Armed with :meth:`PgProxy.lose_commit_reply_after`, the next connection whose client
sends a message containing the marker (e.g. ``DELETE FROM eskit_events``) has its next
client message containing ``COMMIT`` forwarded to the server; the proxy then waits for
the server's whole reply (up to ReadyForQuery: the transaction has committed), drops
it, and closes both sides of that connection. The client sees the connection die while
it waits for its COMMIT's reply. Only one reply is lost per arming; every other
connection, and every connection opened afterwards, passes through unchanged.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field

#: Codes of the untyped requests a client may send before its StartupMessage.
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_READY_FOR_QUERY = b"Z"


class _Closed(Exception):
    """A side of the connection closed (or was closed by the proxy)."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        try:
            chunk = sock.recv(n - len(chunks))
        except OSError as exc:
            raise _Closed() from exc
        if not chunk:
            raise _Closed()
        chunks += chunk
    return bytes(chunks)


def _untyped_message(sock: socket.socket) -> bytes:
    """A startup-phase message: int32 length (itself included), then the body."""
    header = _recv_exact(sock, 4)
    (length,) = struct.unpack("!i", header)
    return header + _recv_exact(sock, length - 4)


def _typed_message(sock: socket.socket) -> bytes:
    """A regular message: one type byte, int32 length (itself included), the body."""
    header = _recv_exact(sock, 5)
    (length,) = struct.unpack("!i", header[1:])
    return header + _recv_exact(sock, length - 4)


@dataclass
class DroppedReply:
    """A COMMIT the server answered, whose reply the client never got."""

    commit: bytes
    reply: bytes


@dataclass
class _Link:
    client: socket.socket
    server: socket.socket
    saw_marker: bool = False
    #: Set by the client pump once it forwarded the doomed COMMIT.
    dropping: bool = False
    commit: bytes = b""
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class PgProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``upstream``.

    Use as a context manager; ``port`` is where clients connect.
    """

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._marker: bytes | None = None
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        #: Every reply dropped so far.
        self.dropped: list[DroppedReply] = []
        #: Set when a reply has been dropped and its connection closed.
        self.reply_dropped = threading.Event()
        self.connections = 0
        self._acceptor = threading.Thread(target=self._accept, name="pg-proxy-accept", daemon=True)

    # -- control -----------------------------------------------------------------------

    def start(self) -> PgProxy:
        self._acceptor.start()
        return self

    def lose_commit_reply_after(self, marker: bytes) -> None:
        """Arm: lose the reply of the next COMMIT on a connection that sent ``marker``."""
        with self._lock:
            self._marker = marker
            self.reply_dropped.clear()

    @property
    def armed(self) -> bool:
        with self._lock:
            return self._marker is not None

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> PgProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- forwarding --------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            client.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, server)
            with self._lock:
                self._links.append(link)
                self.connections += 1
            for target, name in ((self._from_client, "client"), (self._from_server, "server")):
                thread = threading.Thread(
                    target=target, args=(link,), name=f"pg-proxy-{name}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def _from_client(self, link: _Link) -> None:
        try:
            while True:  # the startup phase: encryption requests, then the StartupMessage
                message = _untyped_message(link.client)
                code = struct.unpack("!i", message[4:8])[0] if len(message) >= 8 else None
                if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                    link.client.sendall(b"N")  # no encryption: keep the bytes readable
                    continue
                link.server.sendall(message)
                break
            while True:
                message = _typed_message(link.client)
                self._inspect(link, message)
                link.server.sendall(message)
        except (_Closed, OSError):
            pass
        finally:
            link.close()

    def _inspect(self, link: _Link, message: bytes) -> None:
        """Decide, before ``message`` is forwarded, whether its reply is to be lost."""
        with self._lock:
            marker = self._marker
            if marker is None:
                return
            if not link.saw_marker:
                link.saw_marker = marker in message
                return
            if b"COMMIT" in message:
                self._marker = None  # one reply per arming; other connections go on
                link.commit = message
                link.dropping = True  # the server pump keeps the reply from now on

    def _from_server(self, link: _Link) -> None:
        reply = bytearray()
        try:
            while True:
                message = _typed_message(link.server)
                if not link.dropping:
                    link.client.sendall(message)
                    continue
                reply += message
                if message[:1] == _READY_FOR_QUERY:  # the COMMIT's whole reply is here
                    self.dropped.append(DroppedReply(link.commit, bytes(reply)))
                    self.reply_dropped.set()  # before the client can notice the close
                    link.close()
                    return
        except (_Closed, OSError):
            pass
        finally:
            link.close()
