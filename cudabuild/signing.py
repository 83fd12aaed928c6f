"""Module signatures for Secure Boot (FACTS.md, "Module signing").

The user's key and certificate are loaded and matched here, on the host; the key's bytes go no
further than a private directory in memory (/dev/shm) that only the signing container mounts,
read-only, and that is removed when it ends. No message names anything of the key but its path.

A signed module ends with a PKCS#7 (CMS) signature, a 12-byte `struct module_signature` and the
magic `~Module signature appended~\\n` (include/linux/module_signature.h). It is checked here
against a certificate over the module's own bytes, as the kernel does: a module whose signature is
missing, malformed, by another key or over other bytes fails verification."""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cudabuild.errors import InputError, VerifyError, shown

MAGIC = b"~Module signature appended~\n"
_TRAILER = struct.Struct(">BBBBB3xI")  # algo, hash, id_type, signer_len, key_id_len, pad[3], sig_len
PKEY_ID_PKCS7 = 2
_HASHES = {"sha1", "sha224", "sha256", "sha384", "sha512"}
MAX_SIGNATURE_BYTES = 64 * 1024


def is_signed(path: Path) -> bool:
    """Whether the file ends with a module signature's magic (what the loader checks, too)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < len(MAGIC):
                return False
            f.seek(-len(MAGIC), os.SEEK_END)
            return f.read() == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class Certificate:
    """An X.509 certificate: what a signed artifact records, and what its signatures are checked against."""

    der: bytes

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Certificate:
        from cryptography import x509

        for load in (x509.load_pem_x509_certificate, x509.load_der_x509_certificate):
            try:
                return cls(load(data).public_bytes(_der()))
            except ValueError:
                continue
        raise InputError(f"{where} is not an X.509 certificate (PEM or DER)",
                         hint="pass the certificate made with the key, e.g. openssl req -x509 -newkey rsa:2048 "
                              "-keyout key.pem -out cert.pem -subj '/CN=my module key'")

    @classmethod
    def load(cls, path: Path, flag: str = "--sign-cert") -> Certificate:
        try:
            data = Path(path).read_bytes()[:1 << 20]
        except OSError as exc:
            raise InputError(f"{flag} {shown(str(path))}: {exc.strerror}", hint="pass a readable certificate") from exc
        return cls.from_bytes(data, f"{flag} {shown(str(path))}")

    @property
    def x509(self):
        from cryptography import x509

        return x509.load_der_x509_certificate(self.der)

    @property
    def pem(self) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding

        return self.x509.public_bytes(Encoding.PEM).decode()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    @property
    def signer(self) -> str:
        """What modinfo shows as `signer`: the subject's common name (else the whole subject)."""
        from cryptography.x509.oid import NameOID

        cert = self.x509
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else cert.subject.rfc4514_string()

    @property
    def key_id(self) -> str:
        """What modinfo shows as `sig_key` for a PKCS#7 signature: the serial number, in hex pairs."""
        serial = format(self.x509.serial_number, "X")
        serial = ("0" + serial) if len(serial) % 2 else serial
        return ":".join(serial[i:i + 2] for i in range(0, len(serial), 2))

    def record(self, hash_name: str) -> dict:
        """What a manifest keeps of a signed build: enough to check it anywhere, nothing secret."""
        return {"signer": self.signer, "key_id": self.key_id, "cert_sha256": self.sha256, "hash": hash_name,
                "certificate": self.pem}


def _der():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


@dataclass(frozen=True)
class SigningKey:
    """The user's key (its path; its bytes are read only to check it and to stage it) and certificate."""

    key_path: Path
    certificate: Certificate
    pin: str | None = None

    @contextmanager
    def staged(self, owner: tuple[int, int]) -> Iterator[Path]:
        """The key, the certificate and the PIN in a fresh private directory in memory, given to
        `owner` (the signing container's user), read-only; removed when the block ends."""
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        directory = Path(tempfile.mkdtemp(prefix="cudabuild-sign-", dir=base))
        try:
            files = {"key.pem": self.key_path.read_bytes(), "cert.pem": self.certificate.pem.encode()}
            if self.pin:
                files["pin"] = self.pin.encode()
            for name, data in files.items():
                fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                if os.getuid() == 0:
                    os.chown(directory / name, *owner)
            if os.getuid() == 0:
                os.chown(directory, *owner)
            os.chmod(directory, 0o500)
            yield directory
        finally:
            os.chmod(directory, 0o700)
            shutil.rmtree(directory, ignore_errors=True)


def load_signing_key(key: str, cert: str, pin: str | None) -> SigningKey:
    """The key and certificate the user named, checked to belong together; an encrypted key is
    opened with KBUILD_SIGN_PIN. Errors name the files, never their contents."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    certificate = Certificate.load(Path(cert))
    try:
        data = Path(key).expanduser().read_bytes()[:1 << 20]
    except OSError as exc:
        raise InputError(f"--sign-key {shown(key)}: {exc.strerror}", hint="pass a readable PEM private key") from exc
    try:
        try:
            private = load_pem_private_key(data, password=pin.encode() if pin else None)
        except TypeError:
            if not pin:
                raise InputError(f"--sign-key {shown(key)} is encrypted", hint="set KBUILD_SIGN_PIN to its "
                                 "passphrase (the kernel's sign-file reads the same variable)") from None
            private = load_pem_private_key(data, password=None)  # not encrypted: the PIN is not needed
    except ValueError:
        raise InputError(f"--sign-key {shown(key)} is not a PEM private key cudabuild can open"
                         + (" with KBUILD_SIGN_PIN" if pin else ""),
                         hint="pass the PEM key made with the certificate (openssl req -x509 -newkey rsa:2048 "
                              "-keyout key.pem ...); check KBUILD_SIGN_PIN for an encrypted one") from None
    ours = private.public_key().public_bytes(_der(), _spki())
    theirs = certificate.x509.public_key().public_bytes(_der(), _spki())
    if ours != theirs:
        raise InputError(f"--sign-key {shown(key)} does not belong to --sign-cert {shown(cert)}",
                         hint="pass the certificate made with this key")
    return SigningKey(key_path=Path(key).expanduser(), certificate=certificate, pin=pin)


def _spki():
    from cryptography.hazmat.primitives.serialization import PublicFormat

    return PublicFormat.SubjectPublicKeyInfo


@dataclass(frozen=True)
class Signature:
    hash_name: str  # sha256, ...
    signed_bytes: int  # the module's own bytes, before the signature


def verify_signature(path: Path, certificate: Certificate) -> Signature:
    """Check the signature appended to module `path` against `certificate`, over the module's
    own bytes; VerifyError saying what is wrong otherwise."""
    from asn1crypto import cms

    name = path.name
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < len(MAGIC) + _TRAILER.size:
            raise VerifyError(f"{name} is not signed (no module signature at its end)")
        f.seek(size - len(MAGIC) - _TRAILER.size)
        trailer = f.read(_TRAILER.size)
        if f.read() != MAGIC:
            raise VerifyError(f"{name} is not signed (no module signature at its end)",
                              hint="build with --sign-key KEY --sign-cert CERT")
        _, _, id_type, _, _, sig_len = _TRAILER.unpack(trailer)
        start = size - len(MAGIC) - _TRAILER.size - sig_len
        if id_type != PKEY_ID_PKCS7 or not 0 < sig_len <= MAX_SIGNATURE_BYTES or start <= 0:
            raise VerifyError(f"{name} has a module signature cudabuild cannot read (id type {id_type}, "
                              f"{sig_len} bytes)")
        f.seek(start)
        raw = f.read(sig_len)
    try:
        signed = cms.ContentInfo.load(raw)
        if signed["content_type"].native != "signed_data":
            raise ValueError("not CMS SignedData")
        [info] = signed["content"]["signer_infos"]
        hash_name = info["digest_algorithm"]["algorithm"].native
        algorithm = info["signature_algorithm"].signature_algo
        value = info["signature"].native
        attrs = info["signed_attrs"]
        sid = info["sid"]
    except (ValueError, TypeError, KeyError) as exc:
        raise VerifyError(f"{name}'s signature is not a PKCS#7 signature cudabuild can read "
                          f"({str(exc).splitlines()[0][:120]})") from exc
    if hash_name not in _HASHES:
        raise VerifyError(f"{name} is signed with {shown(hash_name)}, which the kernel does not take")
    cert = certificate.x509
    if sid.name == "issuer_and_serial_number":
        if sid.chosen["serial_number"].native != cert.serial_number:
            raise VerifyError(f"{name} is signed by another key (serial {sid.chosen['serial_number'].native:X}), not "
                              f"{certificate.signer} ({certificate.key_id})")
    digest = hashlib.new(hash_name)
    with open(path, "rb") as f:
        left = start
        while left:
            chunk = f.read(min(left, 1 << 20))
            digest.update(chunk)
            left -= len(chunk)
    content_digest = digest.digest()
    if attrs.native is not None and len(attrs):
        attr = {a["type"].native: a["values"] for a in attrs}
        if "message_digest" not in attr or attr["message_digest"][0].native != content_digest:
            raise VerifyError(f"{name}'s signature is over other bytes than the module's")
        data, prehashed = attrs.untag().dump(), False
    else:
        data, prehashed = content_digest, True
    _check(cert.public_key(), algorithm, value, data, hash_name, prehashed, name, certificate)
    return Signature(hash_name=hash_name, signed_bytes=start)


def _check(public_key, algorithm: str, value: bytes, data: bytes, hash_name: str, prehashed: bool, name: str,
           certificate: Certificate) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    chosen = getattr(hashes, hash_name.upper())()
    how = Prehashed(chosen) if prehashed else chosen
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and algorithm == "rsassa_pkcs1v15":
            public_key.verify(value, data, padding.PKCS1v15(), how)
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and algorithm == "ecdsa":
            public_key.verify(value, data, ec.ECDSA(how))
        else:
            raise VerifyError(f"{name} is signed with {algorithm}, which does not fit the certificate's key")
    except InvalidSignature:
        raise VerifyError(f"{name}'s signature does not verify against {certificate.signer} "
                          f"(certificate sha256 {certificate.sha256[:16]}...): the module was changed after signing, "
                          "or another key signed it") from None
