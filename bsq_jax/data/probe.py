"""Is the download host reachable? Asked in seconds, before tfds is.

Offline, tfds's download (requests, with retries and backoff) takes minutes
to give up. `unreachable(url)` instead opens one TCP connection toward the
URL within PROBE_TIMEOUT_S seconds, name lookup included:

  * no proxy: to the URL's host and port (www.cs.toronto.edu:443 for CIFAR);
  * through the proxy that urllib, like requests, takes from the environment
    (https_proxy, ...; no_proxy exempts hosts): to the proxy, and for an
    https URL it asks the proxy for a tunnel (CONNECT host:443) and wants
    "200" back, so a proxy that cannot reach the host counts as offline.

No TLS and no HTTP request to the host itself: a connection that opens is
enough to hand over to tfds, which then reports its own errors.
"""

from __future__ import annotations

import base64
import socket
import threading
import urllib.parse
import urllib.request
from typing import NamedTuple, Optional

PROBE_TIMEOUT_S = 3.0  # seconds the host (or proxy) has to answer


class Route(NamedTuple):
  host: str            # where the first TCP connection goes
  port: int
  tunnel: str          # "host:port" to CONNECT to through a proxy, or ""
  auth: str            # a Proxy-Authorization header value, or ""


def route(url: str) -> Route:
  """Where a download of `url` connects first (see the module doc)."""
  parts = urllib.parse.urlsplit(url)
  host = parts.hostname or ""
  port = parts.port or (443 if parts.scheme == "https" else 80)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if not proxy or urllib.request.proxy_bypass(host):
    return Route(host, port, "", "")
  p = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
  auth = ""
  if p.username:
    user = urllib.parse.unquote(p.username)
    password = urllib.parse.unquote(p.password or "")
    auth = "Basic " + base64.b64encode(
        f"{user}:{password}".encode()).decode()
  return Route(p.hostname or "", p.port or
               (443 if p.scheme == "https" else 80),
               f"{host}:{port}" if parts.scheme == "https" else "", auth)


def _connect(r: Route, timeout: float) -> None:
  """Raises OSError unless `r` connects (and, via a proxy, tunnels)."""
  with socket.create_connection((r.host, r.port), timeout=timeout) as sock:
    if not r.tunnel:
      return
    request = f"CONNECT {r.tunnel} HTTP/1.1\r\nHost: {r.tunnel}\r\n"
    if r.auth:
      request += f"Proxy-Authorization: {r.auth}\r\n"
    sock.sendall((request + "\r\n").encode())
    status = sock.makefile("rb").readline(200).decode("latin-1").strip()
    if status.split()[1:2] != ["200"]:
      raise OSError(f"proxy answered {status or 'nothing'!r} to CONNECT "
                    f"{r.tunnel}")


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
  """None if `url`'s host (or proxy) answers within `timeout` seconds; else
  why not, in a few words on one line."""
  r = route(url)
  where = f"{r.host}:{r.port}" + (f" (proxy for {r.tunnel})" if r.tunnel
                                  else "")
  outcome = []

  def attempt():
    try:
      _connect(r, timeout)
      outcome.append(None)
    except OSError as e:  # gaierror (no DNS), refused, unreachable, timeout
      outcome.append(" ".join(f"{type(e).__name__}: {e}".split()))

  # In a thread: create_connection's timeout does not bound the name lookup.
  # A lookup that hangs is left behind (a daemon thread, ended with the
  # process), and the answer is "did not answer".
  thread = threading.Thread(target=attempt, name="download-probe",
                            daemon=True)
  thread.start()
  thread.join(timeout)
  if not outcome:
    return f"{where} did not answer within {timeout:g} s"
  return None if outcome[0] is None else f"{where}: {outcome[0]}"
