"""A reverse proxy in front of fake-gcs-server that numbers the parts of batch requests.

    python tests/gcs_batch_proxy.py LISTEN_PORT EMULATOR_URL

fake-gcs-server (up to at least v1.54) skips each part of a `POST /batch/storage/v1` request
that has no `Content-ID` header (fsouza/fake-gcs-server#411), and google-cloud-storage sends
none; the client then fails with `ValueError: Bad response: not multi-part` in Beam's rename,
multi-file delete and `WriteToText` finalize. This proxy gives every such part
`Content-ID: <n>` (1, 2, ...) and passes every other request through unchanged. Standard
library only, so it runs under any Python.
"""

from __future__ import annotations

import http.client
import http.server
import re
import sys
import urllib.parse

# Hop-by-hop headers: they describe one connection, never the message.
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


def number_batch_parts(body: bytes, content_type: str) -> bytes:
    """`body` (a multipart/mixed batch) with `Content-ID: <n>` added to each part lacking one.

    The n-th part (from 1) gets n. Line ends are kept: a part's header block ends at its first
    blank line, CRLF or LF.
    """
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        return body
    delimiter = b"--" + match.group(1).encode()
    pieces = body.split(delimiter)
    for n in range(1, len(pieces)):
        piece = pieces[n]
        if piece.startswith(b"--"):  # the closing delimiter
            continue
        newline = b"\r\n" if piece.startswith(b"\r\n") else b"\n"
        end = piece.find(newline * 2)
        if end < 0 or b"content-id:" in piece[:end].lower():
            continue
        pieces[n] = piece[:end] + newline + b"Content-ID: " + str(n).encode() + piece[end:]
    return delimiter.join(pieces)


class _Handler(http.server.BaseHTTPRequestHandler):
    upstream: urllib.parse.SplitResult

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if self.path.startswith("/batch/"):
            body = number_batch_parts(body, self.headers.get("Content-Type", ""))
        headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection(
            self.upstream.hostname, self.upstream.port, timeout=300
        )
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


def main(argv: list[str]) -> None:
    port, upstream = int(argv[0]), argv[1]
    _Handler.upstream = urllib.parse.urlsplit(upstream)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
