"""bsq_jax.data.probe: the seconds-long reachability check before a download.

Local sockets only (a closed port, a listener, a fake proxy): no network."""

import socket
import threading

import pytest

from bsq_jax.data import probe

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_env(monkeypatch):
  for name in PROXY_VARS:
    monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def listener():
  """A local listening socket; yields (port, answer) where answer(bytes)
  sets what it sends to each connection (None: send nothing)."""
  server = socket.create_server(("127.0.0.1", 0))
  reply = {"bytes": None}
  stop = threading.Event()

  def serve():
    server.settimeout(0.1)
    while not stop.is_set():
      try:
        conn, _ = server.accept()
      except OSError:
        continue
      with conn:
        if reply["bytes"] is None:
          stop.wait(1.0)  # silent: holds the connection open, then closes
        else:
          conn.recv(1024)
          conn.sendall(reply["bytes"])

  thread = threading.Thread(target=serve, daemon=True)
  thread.start()
  yield server.getsockname()[1], lambda b: reply.update(bytes=b)
  stop.set()
  thread.join()
  server.close()


def closed_port():
  with socket.create_server(("127.0.0.1", 0)) as s:
    return s.getsockname()[1]


def test_route_direct_proxy_and_no_proxy(monkeypatch):
  url = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
  assert probe.route(url) == ("www.cs.toronto.edu", 443, "", "")
  assert probe.route("http://example.org:8080/x")[:2] == ("example.org", 8080)
  monkeypatch.setenv("https_proxy", "http://user:p%40ss@proxy.local:3128")
  r = probe.route(url)
  assert r[:3] == ("proxy.local", 3128, "www.cs.toronto.edu:443")
  assert r.auth == "Basic dXNlcjpwQHNz"  # base64("user:p@ss")
  monkeypatch.setenv("no_proxy", ".toronto.edu")
  assert probe.route(url) == ("www.cs.toronto.edu", 443, "", "")


def test_closed_port_is_unreachable():
  port = closed_port()
  why = probe.unreachable(f"https://127.0.0.1:{port}/a.tar.gz")
  assert why.startswith(f"127.0.0.1:{port}: ConnectionRefusedError"), why
  assert "\n" not in why


def test_a_listening_host_is_reachable(listener):
  port, _ = listener
  assert probe.unreachable(f"https://127.0.0.1:{port}/a.tar.gz") is None


def test_failed_name_lookup_is_unreachable(monkeypatch):
  def no_dns(address, *args, **kwargs):
    raise socket.gaierror(-2, "Name or service not known")

  monkeypatch.setattr(socket, "create_connection", no_dns)
  why = probe.unreachable("https://www.cs.toronto.edu/x")
  assert why == ("www.cs.toronto.edu:443: gaierror: [Errno -2] Name or "
                 "service not known")


def test_a_hanging_lookup_is_cut_at_the_timeout(monkeypatch):
  release = threading.Event()

  def hang(address, *args, **kwargs):
    release.wait(5)
    raise OSError("released")

  monkeypatch.setattr(socket, "create_connection", hang)
  try:
    why = probe.unreachable("https://www.cs.toronto.edu/x", timeout=0.2)
  finally:
    release.set()
  assert why == "www.cs.toronto.edu:443 did not answer within 0.2 s"


@pytest.mark.parametrize("answer, ok", [
    (b"HTTP/1.1 200 Connection established\r\n\r\n", True),
    (b"HTTP/1.1 403 Forbidden\r\n\r\n", False),
    (b"", False)])
def test_a_proxy_must_open_the_tunnel(listener, monkeypatch, answer, ok):
  port, reply = listener
  reply(answer)
  monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
  why = probe.unreachable("https://www.cs.toronto.edu/x", timeout=2)
  if ok:
    assert why is None
  else:
    assert why.startswith(f"127.0.0.1:{port} (proxy for "
                          "www.cs.toronto.edu:443): OSError: proxy answered")


def test_a_silent_proxy_times_out(listener, monkeypatch):
  port, _ = listener  # accepts, never answers
  monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
  why = probe.unreachable("https://www.cs.toronto.edu/x", timeout=0.3)
  assert why.startswith(f"127.0.0.1:{port} (proxy for www.cs.toronto.edu:443)")
  assert "0.3 s" in why or "timed out" in why
