"""Keep-alive HTTP(S) connections from one tier to the next (a tier's forwarding, a relay, `plan --measure`)."""
from __future__ import annotations

import http.client
import ssl
import threading

from ..config import ClientTLS, NextURL


class KeptConnections:
    """Keep-alive HTTP connections to the next tier, one per calling thread, so that a crossing pays no TCP
    handshake (a round trip of the link). A kept connection the next tier closed while it sat idle (uvicorn closes
    them after 5 s) is opened again once; on any other failure it is closed and the error raised."""

    STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)

    def __init__(self, url: NextURL, timeout: float, tls: ClientTLS = ClientTLS()):
        self.url, self.timeout, self.local = url, timeout, threading.local()
        self.context = tls.context() if url.tls else None

    def request(self, method: str, path: str, body: bytes | None,
                headers: dict[str, str]) -> tuple[int, bytes, http.client.HTTPResponse]:
        """(status, body, the response) of one request."""
        while True:
            conn, reused = getattr(self.local, "conn", None), True
            if conn is None:
                conn, reused = connect(self.url, self.timeout, self.context), False
                self.local.conn = conn
            try:
                conn.request(method, path, body, headers)
                response = conn.getresponse()
                data = response.read()
            except Exception as e:
                conn.close()
                self.local.conn = None
                if reused and isinstance(e, self.STALE):
                    continue
                if self.context is not None and isinstance(e, (*self.STALE, ssl.SSLEOFError)):  # TLS 1.3: a client
                    # certificate refused after the client's side of the handshake ended, seen as the peer gone
                    raise ConnectionError(f"{e or type(e).__name__}: it closed a new TLS connection; does it want a "
                                          "client certificate it trusts (--next-cert, --next-key)?") from e
                raise
            if response.will_close:
                conn.close()
                self.local.conn = None
            return response.status, data, response


def connect(url: NextURL, timeout: float, context: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
    """A connection to `url`'s host: over TLS for https, verified by `context` (None: the system's certificates)."""
    if url.tls:
        return http.client.HTTPSConnection(url.host, url.port, timeout=timeout,
                                           context=context or ssl.create_default_context())
    return http.client.HTTPConnection(url.host, url.port, timeout=timeout)
