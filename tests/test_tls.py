"""HTTPS: certificates made at test time (trustme), real TLS clients, both worker kinds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import time

import pytest
import trustme
from conftest import APP_OF, APPS, Reader, closed_by_peer, forkserve_command
from cryptography.hazmat.primitives import serialization

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.private_key_and_cert_chain_pem.write_to_path(str(folder / "server.pem"))
    server.cert_chain_pems[0].write_to_path(str(folder / "server-cert.pem"))
    server.private_key_pem.write_to_path(str(folder / "server-key.pem"))
    client = ca.issue_cert("client@example.com", common_name="alice")
    client.private_key_and_cert_chain_pem.write_to_path(str(folder / "client.pem"))
    other_ca = trustme.CA()
    other_ca.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    other = other_ca.issue_cert("127.0.0.1")
    other.private_key_and_cert_chain_pem.write_to_path(str(folder / "other-server.pem"))
    stranger = other_ca.issue_cert("mallory@example.com", common_name="mallory")
    stranger.private_key_and_cert_chain_pem.write_to_path(str(folder / "stranger.pem"))
    key = serialization.load_pem_private_key(server.private_key_pem.bytes(), None)
    (folder / "encrypted.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")) + server.cert_chain_pems[0].bytes())
    return folder


def client_context(cafile, certfile=None, maximum=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    context.set_alpn_protocols(["h2", "http/1.1"])
    if certfile:
        context.load_cert_chain(str(certfile))
    if maximum:
        context.maximum_version = maximum
    return context


def tls_connect(server, context: ssl.SSLContext, strict_eof: bool = False) -> ssl.SSLSocket:
    """A TLS connection; with `strict_eof` an end without close_notify raises SSLEOFError."""
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1",
                               suppress_ragged_eofs=not strict_eof)


def get(sock: ssl.SSLSocket, path: str, body: bytes = b"") -> tuple:
    method = b"POST" if body else b"GET"
    sock.sendall(b"%s %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s"
                 % (method, path.encode(), len(body), body))
    return Reader(sock).response()


def scope_of(interface: str, sock: ssl.SSLSocket) -> dict:
    """What the app saw of the connection: the WSGI environ or the ASGI scope."""
    response = get(sock, "/environ" if interface == "wsgi" else "/scope")
    assert response.status == 200
    return json.loads(response.body)


@pytest.fixture
def https_server(start_server, interface, pki):
    server = start_server(APP_OF[interface], "-w", "2", "--certfile", str(pki / "server.pem"))
    server.interface = interface
    return server


def test_https_keep_alive_pipelining_and_large_bodies(https_server, pki):
    assert https_server.url.startswith("https://127.0.0.1:")
    with tls_connect(https_server, client_context(pki / "ca.pem")) as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n" * 3)
        reader = Reader(sock)
        assert [reader.response().body for _ in range(3)] == [b"Hello, World!"] * 3
        payload = os.urandom(3 * 1024 * 1024)  # many TLS records each way
        response = get(sock, "/echo", payload)
        assert response.status == 200 and response.body == payload
        seen = scope_of(https_server.interface, sock)
    if https_server.interface == "wsgi":
        assert seen["wsgi.url_scheme"] == "https" and seen["HTTPS"] == "on"
        assert seen["SSL_PROTOCOL"] == "TLSv1.3" and "SSL_CLIENT_CERT" not in seen
    else:
        assert seen["scheme"] == "https"
        tls = seen["extensions"]["tls"]
        assert tls["tls_version"] == 0x0304 and tls["client_cert_chain"] == []
        assert isinstance(tls["cipher_suite"], int)


def test_a_file_is_copied_through_tls(start_server, pki, tmp_path):
    """sendfile() cannot encrypt: wsgi.file_wrapper bodies go through the TLS socket."""
    data = os.urandom(2 * 1024 * 1024 + 17)
    (tmp_path / "blob").write_bytes(data)
    server = start_server("wsgiapp:app", "-w", "1", "--certfile", str(pki / "server.pem"))
    with tls_connect(server, client_context(pki / "ca.pem")) as sock:
        response = get(sock, f"/file?path={tmp_path / 'blob'}")
        assert response.status == 200 and response.body == data
        assert get(sock, "/hello").body == b"Hello, World!"  # still in step


def test_plain_http_to_an_https_port_gets_a_readable_400(https_server, pki):
    with https_server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        response = Reader(sock).response()
        assert response.status == 400
        assert b"expects HTTPS" in response.body
        assert closed_by_peer(sock)
    with tls_connect(https_server, client_context(pki / "ca.pem")) as sock:
        assert get(sock, "/hello").status == 200


def test_garbage_and_stalled_handshakes_are_dropped(start_server, interface, pki):
    server = start_server(APP_OF[interface], "-w", "1", "--header-timeout", "1",
                          "--certfile", str(pki / "server.pem"))
    with server.connect() as garbage:
        garbage.sendall(b"\x16\x03\x01\x00\x20" + b"\xff" * 32)
        assert closed_by_peer(garbage)
    with server.connect() as stalled:
        stalled.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello that never ends
        started = time.monotonic()
        assert closed_by_peer(stalled, timeout=10)
        assert time.monotonic() - started < 5
    with tls_connect(server, client_context(pki / "ca.pem")) as sock:
        assert get(sock, "/hello").status == 200


def test_tls_min_version(start_server, interface, pki):
    server = start_server(APP_OF[interface], "-w", "1", "--certfile", str(pki / "server.pem"),
                          "--tls-min-version", "1.3")
    with pytest.raises(ssl.SSLError):
        tls_connect(server, client_context(pki / "ca.pem", maximum=ssl.TLSVersion.TLSv1_2))
    with tls_connect(server, client_context(pki / "ca.pem")) as sock:
        assert sock.version() == "TLSv1.3"
        assert get(sock, "/hello").status == 200


def refused(server, context: ssl.SSLContext) -> bool:
    """Whether the server refuses this client's handshake (in TLS 1.3 the client learns it
    on its first read)."""
    try:
        with tls_connect(server, context) as sock:
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            return sock.recv(65536) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def test_client_certificates_required(start_server, interface, pki):
    server = start_server(APP_OF[interface], "-w", "1", "--certfile", str(pki / "server.pem"),
                          "--ca-certs", str(pki / "ca.pem"), "--client-cert", "required")
    assert refused(server, client_context(pki / "ca.pem"))
    assert refused(server, client_context(pki / "ca.pem", pki / "stranger.pem"))
    with tls_connect(server, client_context(pki / "ca.pem", pki / "client.pem")) as sock:
        seen = scope_of(interface, sock)
    if interface == "wsgi":
        assert seen["SSL_CLIENT_S_DN"].startswith("CN=alice")
        assert seen["SSL_CLIENT_CERT"].startswith("-----BEGIN CERTIFICATE-----")
    else:
        tls = seen["extensions"]["tls"]
        assert tls["client_cert_name"].startswith("CN=alice")
        assert tls["client_cert_chain"][0].startswith("-----BEGIN CERTIFICATE-----")


def test_client_certificates_optional(start_server, pki):
    server = start_server("wsgiapp:app", "-w", "1", "--certfile", str(pki / "server.pem"),
                          "--ca-certs", str(pki / "ca.pem"), "--client-cert", "optional")
    with tls_connect(server, client_context(pki / "ca.pem")) as sock:
        assert "SSL_CLIENT_CERT" not in scope_of("wsgi", sock)
    assert refused(server, client_context(pki / "ca.pem", pki / "stranger.pem"))


def test_hup_reloads_the_certificate(start_server, pki, tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_bytes((pki / "server.pem").read_bytes())
    server = start_server("wsgiapp:app", "-w", "2", "--certfile", str(cert))
    ours, theirs = client_context(pki / "ca.pem"), client_context(pki / "other-ca.pem")
    with tls_connect(server, ours) as sock:
        assert get(sock, "/hello").status == 200
    cert.write_bytes((pki / "other-server.pem").read_bytes())
    old = server.workers()
    mark = server.mark()
    os.kill(server.pid, signal.SIGHUP)
    for pid in old:  # the old workers serve with the old certificate until they exit
        server.wait_for(rf"\(pid {pid}\) exited", start=mark)
    with tls_connect(server, theirs) as sock:
        assert get(sock, "/hello").status == 200
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_connect(server, ours)
    # A broken certificate on HUP: said so, and the workers keep the good one (the rest of
    # the configuration still reloads).
    cert.write_text("not a certificate\n")
    old = server.workers()
    mark = server.mark()
    os.kill(server.pid, signal.SIGHUP)
    server.wait_for(r"HUP: cannot load --certfile .*; the new workers keep the certificate in "
                    r"use", start=mark)
    for pid in old:
        server.wait_for(rf"\(pid {pid}\) exited", start=mark)
    with tls_connect(server, theirs) as sock:
        assert get(sock, "/hello").status == 200


@pytest.mark.parametrize("args, message", [
    (["--certfile", "/nonexistent/cert.pem"],
     "cannot read --certfile /nonexistent/cert.pem: No such file or directory"),
    (["--certfile", "{pki}/server.pem", "--ca-certs", "{pki}/none.pem"],
     "cannot read --ca-certs"),
    (["--certfile", "{pki}/server-cert.pem"], "cannot load --certfile"),
    (["--certfile", "{pki}/server-cert.pem", "--keyfile", "{pki}/stranger.pem"],
     "key values mismatch"),
    (["--certfile", "{pki}/encrypted.pem"], "is encrypted; give it unencrypted"),
    (["--keyfile", "{pki}/server-key.pem"], "--keyfile needs --certfile"),
    (["--client-cert", "required"], "--client-cert needs --certfile"),
    (["--certfile", "{pki}/server.pem", "--client-cert", "required"],
     "--client-cert required needs --ca-certs"),
    (["--certfile", "{pki}/server.pem", "--ciphers", "NO-SUCH-CIPHER"],
     "OpenSSL accepts none of these ciphers"),
    (["--certfile", "{pki}/server.pem", "--ca-certs", "{pki}/server-key.pem"],
     "cannot load --ca-certs"),
    (["--certfile", "{pki}/server.pem", "--tls-min-version", "1.1"],
     "expected one of 1.2, 1.3"),
])
@pytest.mark.parametrize("check_only", [True, False], ids=["check-config", "start"])
def test_bad_tls_settings_are_one_line_and_exit_2(pki, args, message, check_only):
    argv = [arg.format(pki=pki) for arg in args] + ["-b", "127.0.0.1:0", "wsgiapp:app"]
    result = subprocess.run(forkserve_command() + (["--check-config"] if check_only else [])
                            + argv, cwd=APPS, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_websocket_over_tls(start_server, pki):
    websockets = pytest.importorskip("websockets")
    server = start_server("asgiapp:app", "-w", "1", "--certfile", str(pki / "server.pem"))

    async def talk() -> str:
        async with websockets.connect(f"wss://127.0.0.1:{server.port}/ws/echo",
                                      ssl=client_context(pki / "ca.pem")) as ws:
            await ws.send("over tls")
            return await ws.recv()

    assert asyncio.run(talk()) == "over tls"


def test_connections_closed_after_a_response_do_not_upset_the_worker(start_server, interface,
                                                                   pki):
    """Closing requests (Connection: close, HTTP/1.0) one after another on one worker: the
    worker's loop must forget each TLS socket, whose descriptor is then reused."""
    server = start_server(APP_OF[interface], "-w", "1", "--certfile", str(pki / "server.pem"))
    context = client_context(pki / "ca.pem")
    for request in [b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                    b"GET /hello HTTP/1.0\r\n\r\n"] * 3:
        with tls_connect(server, context, strict_eof=True) as sock:
            sock.sendall(request)
            assert Reader(sock).response().status == 200
            assert sock.recv(1) == b""  # a close_notify, not a bare end of the connection
    assert "Traceback" not in server.log
