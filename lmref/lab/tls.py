"""A throwaway certificate authority and a server certificate for TLS on loopback, made with the
``openssl`` command line (OpenSSL 3, Debian's): what ``start_nginx(..., tls=...)`` serves and what
a client trusts instead of the system's store. EC P-256 keys, valid for ``days`` days, the server
certificate for 127.0.0.1 and localhost (subjectAltName: clients match names there, not in the
CN). Never for anything but tests and notebooks: the CA's key lies next to its certificate.

Usage::

    import httpx, openai
    from lmref.lab.tls import make_certificates

    tls = make_certificates()              # tls.ca_cert, tls.server_cert, tls.server_key
    lb = services.add(start_nginx([f"127.0.0.1:{replica.port}"], tls=tls))   # https://...
    client = openai.OpenAI(base_url=lb.url + "/v1", api_key=KEY,
                           http_client=httpx.Client(verify=tls.ca_cert))
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True)
class Certificates:
    """PEM files in ``folder``: the CA a client trusts, the server's certificate and key."""

    folder: str
    ca_cert: str
    server_cert: str
    server_key: str


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def make_certificates(
    folder: str | None = None,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    days: int = 2,
) -> Certificates:
    """A CA and a server certificate signed by it for ``hosts`` (IP addresses and DNS names),
    written to ``folder`` (default: a new temporary folder the caller may delete)."""
    folder = folder or tempfile.mkdtemp(prefix="lmref-tls-")
    path = {n: os.path.join(folder, n) for n in ("ca.pem", "ca.key", "server.pem", "server.key")}
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    # The CA: basicConstraints and keyUsage marked critical, as strict verifiers (Python 3.13's
    # default context, VERIFY_X509_STRICT) require of a CA.
    _openssl(
        "req", "-x509", *ec, "-keyout", path["ca.key"], "-out", path["ca.pem"],
        "-days", str(days), "-subj", "/CN=lmref test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    names = []
    for host in hosts:
        try:
            names.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            names.append(f"DNS:{host}")
    extensions = os.path.join(folder, "server.ext")
    with open(extensions, "w") as f:
        f.write(
            f"subjectAltName={','.join(names)}\n"
            "basicConstraints=critical,CA:FALSE\n"
            "keyUsage=critical,digitalSignature\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid,issuer\n"
        )
    csr = os.path.join(folder, "server.csr")
    _openssl(
        "req", "-new", *ec, "-keyout", path["server.key"], "-out", csr,
        "-subj", f"/CN={hosts[0]}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", path["ca.pem"], "-CAkey", path["ca.key"],
        "-CAcreateserial", "-out", path["server.pem"], "-days", str(days),
        "-extfile", extensions,
    )  # fmt: skip
    for key in (path["ca.key"], path["server.key"]):
        os.chmod(key, 0o600)  # nginx's master (this user) reads the key before it drops rights
    return Certificates(folder, path["ca.pem"], path["server.pem"], path["server.key"])
