"""A mitmproxy addon that sends TensorFlow's built-in gs:// filesystem to fake-gcs-server.

    mitmdump -s tests/gcs_proxy_addon.py --set connection_strategy=lazy \\
        --set validate_inbound_headers=false ...      (with GA_WALS_GCS_EMULATOR=http://HOST:PORT)

TF 2.21's GCS filesystem has Google's endpoints built in (`https://www.googleapis.com/...` for
metadata, listings and uploads, `https://storage.googleapis.com/BUCKET/OBJECT` for reads) and no
emulator setting; its libcurl honours `https_proxy`, so this addon, loaded by the intercepting
proxy, rewrites each request for those hosts to the emulator:

- the request goes to the emulator over plain HTTP, without `Transfer-Encoding` (TF's uploads
  carry it next to `Content-Length`, which the proxy accepts only with
  `validate_inbound_headers=false`);
- `GET /storage/v1/b/BUCKET/storageLayout`, which TF asks for before it renames a directory and
  fake-gcs-server answers only from v1.55, is answered here (no hierarchical namespace);
- a `Location` header pointing at the emulator's host (a resumable upload's session; the
  emulator names itself by its `-public-host`, without the port) is rewritten back to
  `https://www.googleapis.com`, so TF's next request comes through the proxy again;
- any other host gets 502, so nothing leaves the machine.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse

from mitmproxy import http

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
_LAYOUT = re.compile(r"^/storage/v1/b/([^/?]+)/storageLayout(\?.*)?$")


class ToEmulator:
    """Rewrites Google's storage hosts to the emulator at $GA_WALS_GCS_EMULATOR."""

    def __init__(self) -> None:
        self.url = os.environ["GA_WALS_GCS_EMULATOR"].rstrip("/")
        self.emulator = urllib.parse.urlsplit(self.url)

    def request(self, flow: http.HTTPFlow) -> None:
        request = flow.request
        if request.pretty_host not in GOOGLE_HOSTS:
            flow.response = http.Response.make(502, f"no route to {request.pretty_host}")
            return
        layout = _LAYOUT.match(request.path)
        if layout and request.method == "GET":
            body = {"kind": "storage#storageLayout", "bucket": layout.group(1)}
            body["location"] = "US"
            body["hierarchicalNamespace"] = {"enabled": False}
            flow.response = http.Response.make(
                200, json.dumps(body), {"Content-Type": "application/json"}
            )
            return
        request.headers.pop("Transfer-Encoding", None)
        request.scheme = "http"
        request.host = self.emulator.hostname
        request.port = self.emulator.port
        request.headers["Host"] = self.emulator.hostname  # path-style reads need the bare host

    def response(self, flow: http.HTTPFlow) -> None:
        location = flow.response.headers.get("Location")
        if not location:
            return
        parts = urllib.parse.urlsplit(location)
        # The emulator names itself by -public-host, without the port.
        if parts.hostname == self.emulator.hostname:
            flow.response.headers["Location"] = urllib.parse.urlunsplit(
                ("https", "www.googleapis.com", parts.path, parts.query, parts.fragment)
            )


addons = [ToEmulator()]
