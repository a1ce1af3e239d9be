"""A typed client of ``aradia serve``: the same views, reads and traces as the library, over HTTP.

    from aradia.client import Client
    with Client("https://hv1:8765", token) as c:
        for p in c.view("web1", "processes")["items"]:
            print(p["pid"], p["name"])
        with c.live("web1", kind=["syscall"], name=["execve"]) as stream:  # subscribed: nothing missed
            t = c.start_trace("web1", {"kind": "syscalls", "syscalls": ["execve"]})
            for ev in stream.events(duration=10):
                print(ev["args"]["filename"])
            c.stop_trace(t["id"])
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx

from aradia.errors import AradiaError


class ServiceError(AradiaError):
    """The service refused or failed a request (``status`` is the HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})")
        self.status = status


def _raise_for(r: httpx.Response) -> None:
    """:class:`ServiceError` with the service's own message for an error answer."""
    if r.status_code >= 400:
        try:
            message = r.json().get("error") or r.text
        except (ValueError, AttributeError):
            message = r.text[:300]
        raise ServiceError(r.status_code, str(message))


def _where(phys: int | None, virt: int | None, pid: int | None) -> dict[str, Any]:
    """The query parameters naming a memory address (addresses in hex, as the API reads them)."""
    return {"phys": None if phys is None else hex(phys), "virt": None if virt is None else hex(virt),
            "pid": pid}


class Client:
    """One service, one token."""

    def __init__(self, url: str, token: str, *, verify: bool | str = True, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise AradiaError(f"--server {url!r}: give http://HOST:PORT or https://HOST:PORT")
        self.url = url.rstrip("/")
        self.token = token
        self.verify = verify
        tls: bool | ssl.SSLContext = ssl.create_default_context(cafile=verify) if isinstance(verify, str) \
            else verify
        self._http = httpx.Client(base_url=self.url + "/api/v1", timeout=timeout, verify=tls,
                                  headers={"Authorization": f"Bearer {token}"})

    def _call(self, method: str, path: str, *, params: dict[str, Any] | None = None,
              body: Any = None, content: bytes | None = None) -> httpx.Response:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            r = self._http.request(method, path, params=clean, json=body, content=content)
        except httpx.HTTPError as e:
            raise ServiceError(0, f"cannot reach {self.url}: {e}") from e
        _raise_for(r)
        return r

    # --- VMs and views ---------------------------------------------------------------------------
    def vms(self) -> list[dict[str, Any]]:
        """The caller's VMs with their run state."""
        return self._call("GET", "/vms").json()

    def info(self, vm: str) -> dict[str, Any]:
        """``aradia info`` of a VM."""
        return self._call("GET", f"/vms/{vm}").json()

    def view(self, vm: str, name: str, pid: int | None = None) -> dict[str, Any]:
        """One view, ``{"items": [...], "warnings": [...]}`` (maps and files need ``pid``)."""
        path = f"/vms/{vm}/{name}" + (f"/{pid}" if name in ("maps", "files") else "")
        return self._call("GET", path).json()

    def memory(self, vm: str, size: int, *, phys: int | None = None, virt: int | None = None,
               pid: int | None = None) -> bytes:
        """Guest memory (physical, kernel-virtual, or process ``pid``'s virtual)."""
        params = {"size": size, **_where(phys, virt, pid)}
        return self._call("GET", f"/vms/{vm}/memory", params=params).content

    def write_memory(self, vm: str, data: bytes, *, phys: int | None = None, virt: int | None = None,
                     pid: int | None = None) -> int:
        """Write guest memory (physical, kernel-virtual, or process ``pid``'s); bytes written."""
        r = self._call("PUT", f"/vms/{vm}/memory", content=data, params=_where(phys, virt, pid))
        return int(r.json()["written"])

    def dump(self, vm: str, path: str, *, format: str = "elf", pause: bool = True) -> int:
        """Download the VM's RAM as a dump file at ``path`` (see ``GET /vms/{vm}/dump``); its size."""
        try:
            with self._http.stream("GET", f"/vms/{vm}/dump", params={"format": format,
                                                                       "pause": str(pause).lower()},
                                   timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for(r)
                size = 0
                with open(path, "wb") as out:
                    for chunk in r.iter_bytes(1 << 20):
                        out.write(chunk)
                        size += len(chunk)
        except httpx.HTTPError as e:
            raise ServiceError(0, f"cannot reach {self.url}: {e}") from e
        return size

    def health(self) -> dict[str, Any]:
        """Owner states, store and bus counters."""
        return self._call("GET", "/health").json()

    # --- traces and events -------------------------------------------------------------------------
    def start_trace(self, vm: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Arm a trace; the answer carries its ``id``."""
        return self._call("POST", f"/vms/{vm}/traces", body=spec).json()

    def trace(self, trace_id: str) -> dict[str, Any]:
        """One trace's state."""
        return self._call("GET", f"/traces/{trace_id}").json()

    def traces(self) -> list[dict[str, Any]]:
        """The caller's traces."""
        return self._call("GET", "/traces").json()

    def update_trace(self, trace_id: str, spec: dict[str, Any]) -> dict[str, Any]:
        """A new spec for an app's trace (e.g. the guard's policy), taken without disarming."""
        return self._call("PUT", f"/traces/{trace_id}", body=spec).json()

    def stop_trace(self, trace_id: str) -> dict[str, Any]:
        """Disarm a trace."""
        return self._call("DELETE", f"/traces/{trace_id}").json()

    def events_page(self, **filters: Any) -> dict[str, Any]:
        """One page of stored events (``vm``, ``kind``, ``pid``, ``since``, ``until``, ``q``, ``limit``,
        ``cursor``): ``{"items": [...], "next": cursor or None}``."""
        return self._call("GET", "/events", params=filters).json()

    def events(self, **filters: Any) -> Iterator[dict[str, Any]]:
        """Every stored event matching ``filters``, page after page."""
        cursor = None
        while True:
            page = self.events_page(**filters, cursor=cursor)
            yield from page["items"]
            cursor = page["next"]
            if not cursor:
                return

    def audit(self, **filters: Any) -> dict[str, Any]:
        """One page of audit rows (operator)."""
        return self._call("GET", "/audit", params=filters).json()

    def live(self, vm: str, **filters: Any) -> LiveStream:
        """Live events of ``vm`` (filters ``kind``, ``name``, ``pid``, ``comm``, ``trace`` as lists, ``q``):
        a :class:`LiveStream`, subscribed when this returns (start a trace after it, miss nothing)."""
        parts = urlsplit(self.url)
        query = urlencode([(k, v) for k, vs in filters.items() if vs is not None
                           for v in (vs if isinstance(vs, list | tuple | set) else [vs])])
        uri = urlunsplit(("wss" if parts.scheme == "https" else "ws", parts.netloc,
                          f"{parts.path}/api/v1/vms/{vm}/events/ws", query, ""))
        context = None
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=self.verify if isinstance(self.verify, str) else None)
            if self.verify is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        return LiveStream(uri, self.token, context)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LiveStream:
    """A WebSocket subscription to one VM's live events; iterate :meth:`events`, then :meth:`close`."""

    def __init__(self, uri: str, token: str, context: ssl.SSLContext | None) -> None:
        from websockets.exceptions import InvalidHandshake, InvalidURI
        from websockets.sync.client import connect

        try:
            ws = connect(uri, additional_headers={"Authorization": f"Bearer {token}"}, ssl=context,
                         open_timeout=30, max_size=1 << 24)
            self._ws = ws.__enter__()  # entered, as websockets wants; close() leaves it
        except (OSError, InvalidHandshake, InvalidURI) as e:
            raise ServiceError(0, f"cannot open {uri}: {e}") from e
        first = self._recv(30)
        if first is None or "subscribed" not in first:
            self.close()
            raise ServiceError(500, f"unexpected first message {first!r}")

    def _recv(self, timeout: float | None) -> dict[str, Any] | None:
        from websockets.exceptions import ConnectionClosed

        try:
            return json.loads(self._ws.recv(timeout=timeout))
        except TimeoutError:
            return None
        except ConnectionClosed as e:
            rcvd = e.rcvd
            if rcvd is not None and rcvd.code >= 4000:
                raise ServiceError(rcvd.code - 4000, rcvd.reason) from None
            raise ServiceError(0, f"the service closed the stream ({e})") from None

    def events(self, duration: float | None = None) -> Iterator[dict[str, Any]]:
        """Records as they come, for ``duration`` seconds (or until closed); ``{"dropped": N}`` items
        say this client fell behind and lost N."""
        end = None if duration is None else time.monotonic() + duration
        while True:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return
            item = self._recv(None if left is None else min(left, 1.0))
            if item is not None:
                yield item

    def close(self) -> None:
        """Unsubscribe."""
        self._ws.close()

    def __enter__(self) -> LiveStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
