"""The study's certificate authority: broker, gateway and hub certificates.

One P-256 CA per deployment signs: the broker's server certificate, the gateway workers'
client certificate (CN ``gateway``), and each enrolled hub's client certificate (CN = its
device id). Mosquitto maps the certificate's CN to the MQTT username
(``use_identity_as_username``), so the ACL pattern ``dct/v1/%u/up`` lets a hub speak only
as itself. Hub private keys never leave the hub: hubs send a CSR, signed here.

The CA also signs the certificate revocation list ``crl.pem`` beside its own files, which
the broker loads (``crlfile``) to refuse revoked hubs' TLS handshakes. A CRL exists from
the CA's creation on (an empty one: Mosquitto will not start without the file) and is
re-issued, whole, on every revocation (``gateway/revocation.py``, docs/broker.md).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import GatewayError
from ingest import keys
from ingest.transport import TlsFiles

log = logging.getLogger(__name__)

CA_VALIDITY = dt.timedelta(days=10 * 365)
# A hub's certificate lasts 90 days and the hub renews it from half its life on (over HTTPS,
# with a request signed by its key: gateway/renewal.py). Revocation is by device status in the
# gateway (checked on every envelope and every renewal) and by the CRL the broker checks at
# every TLS handshake; the short life bounds what a revocation that never reached a broker
# (a stale CRL, a broker restored from a backup) leaves open to one quarter of a trial, not
# its whole length. Renewing from half-life on, a hub unplugged for up to six weeks (a
# holiday, a hospital stay) still renews on its own when it is back; one away longer than its
# certificate's remaining life re-enrolls with a new code (docs/broker.md).
HUB_VALIDITY = dt.timedelta(days=90)
SERVICE_VALIDITY = dt.timedelta(days=2 * 365)
# A CRL's nextUpdate. OpenSSL (so Mosquitto) refuses every client certificate once the CRL
# it loaded is past nextUpdate, so the CRL is re-issued well before: on every revocation and
# by the daily ``trialstream broker publish-crl`` (docs/broker.md). The only reader is our
# own broker, from a local file, so a longer validity costs no security; 30 days leaves
# weeks to notice a refresh job that stopped before any hub is locked out.
CRL_VALIDITY = dt.timedelta(days=30)
GATEWAY_IDENTITY = "gateway"
# A throwaway certificate listed in the CRL it is issued with: the broker refusing it shows
# that the broker has loaded that CRL (``gateway/revocation.py``). The ACL grants it nothing.
PROBE_IDENTITY = "crl-probe"
PROBE_VALIDITY = dt.timedelta(hours=1)


class PkiError(GatewayError):
    """A certificate or CSR that cannot be used; the message says why."""


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trialstream"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class StudyCA:
    def __init__(
        self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, directory: Path
    ) -> None:
        self.key = key
        self.cert = cert
        self.directory = directory

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def crl_path(self) -> Path:
        """The CRL (PEM) the broker's ``crlfile`` names."""
        return self.directory / "crl.pem"

    @classmethod
    def load_or_create(cls, directory: Path, *, name: str = "trialstream study CA") -> StudyCA:
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if key_path.exists() and cert_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            ca = cls(keys.load_private_key(key_path), cert, directory)
            ca._ensure_crl()
            return ca
        directory.mkdir(parents=True, exist_ok=True)
        key = keys.generate_private_key()
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        keys.save_private_key(key, key_path)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        log.info("created study CA directory=%s", directory)
        ca = cls(key, cert, directory)
        ca._ensure_crl()
        return ca

    def _ensure_crl(self) -> None:
        """An empty CRL if there is none yet: the broker's ``crlfile`` must exist."""
        if self.crl_path.exists():
            return
        with self.crl_lock():
            if not self.crl_path.exists():
                self.publish_crl(())

    def current_crl(self) -> x509.CertificateRevocationList | None:
        """The CRL last published, or None if there is none (or it cannot be read)."""
        try:
            return x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return None

    def issue_crl(
        self,
        serials: Iterable[int],
        *,
        now: dt.datetime | None = None,
        previous: x509.CertificateRevocationList | None = None,
    ) -> x509.CertificateRevocationList:
        """A CRL listing ``serials``, signed by the CA, valid for ``CRL_VALIDITY``.

        thisUpdate and the CRL number both increase strictly over ``previous``: a broker
        that adds a reloaded CRL to the ones it holds keeps the one with the latest
        thisUpdate (OpenSSL compares whole seconds), so two CRLs issued within one second
        must still differ.
        """
        this_update = (now or dt.datetime.now(dt.UTC)).replace(microsecond=0)
        number = 1
        if previous is not None:
            this_update = max(this_update, previous.last_update_utc + dt.timedelta(seconds=1))
            ext = previous.extensions.get_extension_for_class(x509.CRLNumber)
            number = ext.value.crl_number + 1
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(this_update)
            .next_update(this_update + CRL_VALIDITY)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        for serial in sorted(set(serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(this_update)
                .build()
            )
        return builder.sign(self.key, hashes.SHA256())

    @contextmanager
    def crl_lock(self) -> Iterator[None]:
        """Held while the revoked serials are read and the CRL written, so two revocations
        at once cannot publish an older list over a newer one."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "crl.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def publish_crl(self, serials: Iterable[int]) -> x509.CertificateRevocationList:
        """Issue a CRL listing ``serials`` and replace ``crl.pem`` with it atomically (a
        temporary file renamed over it), so the broker never reads half a file."""
        crl = self.issue_crl(serials, previous=self.current_crl())
        tmp = self.crl_path.with_name(f".crl.pem.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as f:
                f.write(crl.public_bytes(serialization.Encoding.PEM))
                f.flush()
                os.fsync(f.fileno())
            # The broker (often another user) must read it; a CRL holds nothing secret.
            tmp.chmod(0o644)
            os.replace(tmp, self.crl_path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        log.info(
            "published CRL number=%d revoked=%d next_update=%s",
            crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number,
            len(crl),
            crl.next_update_utc,
        )
        return crl

    def _issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        validity: dt.timedelta,
        *,
        server_hosts: tuple[str, ...] = (),
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server_hosts:
            names: list[x509.GeneralName] = []
            for host in server_hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
            usage = [ExtendedKeyUsageOID.SERVER_AUTH]
        else:
            usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def issue_files(
        self, directory: Path, common_name: str, *, server_hosts: tuple[str, ...] = ()
    ) -> TlsFiles:
        """A key made here and its certificate (for the broker and the gateway, not hubs)."""
        directory.mkdir(parents=True, exist_ok=True)
        stem = common_name.replace("/", "_")
        key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
        if not (key_path.exists() and cert_path.exists()):
            key = keys.generate_private_key()
            validity = SERVICE_VALIDITY
            cert = self._issue(key.public_key(), common_name, validity, server_hosts=server_hosts)
            keys.save_private_key(key, key_path)
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return TlsFiles(cafile=self.cert_path, certfile=cert_path, keyfile=key_path)

    def issue_probe(self, directory: Path) -> tuple[TlsFiles, int]:
        """A short-lived client certificate (CN ``crl-probe``) with a key made here, written
        to ``directory``, and its serial, to be listed in the CRL published with it."""
        key = keys.generate_private_key()
        cert = self._issue(key.public_key(), PROBE_IDENTITY, PROBE_VALIDITY)
        directory.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = directory / "probe.key", directory / "probe.pem"
        keys.save_private_key(key, key_path)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return TlsFiles(self.cert_path, cert_path, key_path), cert.serial_number

    def sign_csr(
        self, csr_pem: bytes, device_id: str, *, key_der: bytes | None = None
    ) -> x509.Certificate:
        """A hub certificate for ``device_id`` from its CSR; the CSR's own name is ignored.
        With ``key_der`` (a renewal) the CSR's key must be that key (DER SubjectPublicKeyInfo)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError("the CSR is not a PEM certificate signing request") from exc
        if not csr.is_signature_valid:
            raise PkiError("the CSR's signature does not verify: it was not made with its key")
        public_key = csr.public_key()
        if (
            not isinstance(public_key, ec.EllipticCurvePublicKey)
            or public_key.curve.name != "secp256r1"
        ):
            raise PkiError("the CSR's key must be an EC P-256 key")
        if key_der is not None and keys.public_key_to_der(public_key) != key_der:
            raise PkiError("the CSR's key is not the key this device enrolled with")
        return self._issue(public_key, device_id, HUB_VALIDITY)


def certificate_serial(cert_pem: bytes | str) -> int:
    """The serial number of a PEM certificate (what a CRL names)."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    return x509.load_pem_x509_certificate(data).serial_number


def certificate_identity(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise PkiError("certificate has no common name")
    return str(names[0].value)


def verify_issued_by(cert_pem: bytes, ca: x509.Certificate) -> None:
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_key = ca.public_key()
    if not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise PkiError("CA key is not EC")
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise PkiError("certificate was not issued by this CA") from exc
