"""Module signatures checked on the host (cudabuild.signing) against signatures made like the
kernel's sign-file makes them (openssl cms, FACTS.md), and the key's checks: it must open, and
belong to the certificate. Modules here are small ELF files built by the tests."""

import shutil
import struct

import pytest

from cudabuild.errors import InputError, VerifyError
from cudabuild.signing import Certificate, is_signed, load_signing_key, verify_signature
from tests.helpers import compile_module, make_signing_key, openssl_verifies, sign_like_sign_file


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_signing_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def module(tmp_path):
    directory = tmp_path / "modules"
    directory.mkdir()
    compile_module(directory, "nvidia")
    return directory / "nvidia.ko"


def test_a_module_signed_like_sign_file_verifies(keys, module, tmp_path):
    assert not is_signed(module)
    sign_like_sign_file(module, keys["key"], keys["cert"])
    assert is_signed(module)
    cert = Certificate.load(keys["cert"])
    signature = verify_signature(module, cert)
    assert signature.hash_name == "sha256"
    assert openssl_verifies(module, keys["cert"], tmp_path)
    assert cert.signer == keys["subject"]
    assert Certificate.load(keys["der"]).sha256 == cert.sha256, "PEM and DER name the same certificate"


def test_one_changed_byte_fails_verification(keys, module):
    sign_like_sign_file(module, keys["key"], keys["cert"])
    data = bytearray(module.read_bytes())
    data[100] ^= 0x01
    module.write_bytes(bytes(data))
    with pytest.raises(VerifyError, match="does not verify against cudabuild test key"):
        verify_signature(module, Certificate.load(keys["cert"]))


def test_another_keys_signature_fails(keys, module, tmp_path):
    other = make_signing_key(tmp_path / "other", "someone else")
    sign_like_sign_file(module, other["key"], other["cert"])
    with pytest.raises(VerifyError, match="signed by another key"):
        verify_signature(module, Certificate.load(keys["cert"]))


def test_a_missing_or_malformed_signature_fails(keys, module):
    cert = Certificate.load(keys["cert"])
    with pytest.raises(VerifyError, match="is not signed"):
        verify_signature(module, cert)
    junk = b"\x30\x03\x02\x01\x00"
    with open(module, "ab") as f:
        f.write(junk + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, len(junk)) + b"~Module signature appended~\n")
    with pytest.raises(VerifyError, match="is not a PKCS#7 signature"):
        verify_signature(module, cert)


def test_signatures_with_signed_attributes_verify_too(keys, module, tmp_path):
    import subprocess

    signature = tmp_path / "sig.p7s"
    subprocess.run(["openssl", "cms", "-sign", "-binary", "-nocerts", "-outform", "DER", "-md", "sha512", "-signer",
                    str(keys["cert"]), "-inkey", str(keys["key"]), "-in", str(module), "-out", str(signature)],
                   check=True)
    raw = signature.read_bytes()
    with open(module, "ab") as f:
        f.write(raw + struct.pack(">BBBBB3xI", 0, 0, 2, 0, 0, len(raw)) + b"~Module signature appended~\n")
    assert verify_signature(module, Certificate.load(keys["cert"])).hash_name == "sha512"


def test_the_key_must_belong_to_the_certificate(keys, tmp_path):
    other = make_signing_key(tmp_path / "other", "someone else")
    with pytest.raises(InputError, match="does not belong to --sign-cert") as refused:
        load_signing_key(str(keys["key"]), str(other["cert"]), None)
    assert "PRIVATE KEY" not in refused.value.message + (refused.value.hint or "")
    assert load_signing_key(str(keys["key"]), str(keys["cert"]), None).certificate.signer == keys["subject"]


def test_an_encrypted_key_takes_kbuild_sign_pin(tmp_path):
    locked = make_signing_key(tmp_path / "locked", passphrase="s3cret-pin")
    with pytest.raises(InputError, match="is encrypted") as refused:
        load_signing_key(str(locked["key"]), str(locked["cert"]), None)
    assert "KBUILD_SIGN_PIN" in refused.value.hint
    with pytest.raises(InputError, match="KBUILD_SIGN_PIN") as wrong:
        load_signing_key(str(locked["key"]), str(locked["cert"]), "wrong")
    assert "s3cret" not in wrong.value.message
    assert load_signing_key(str(locked["key"]), str(locked["cert"]), "s3cret-pin").pin == "s3cret-pin"


def test_a_certificate_that_is_not_one_is_refused(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    with pytest.raises(InputError, match="is not an X.509 certificate"):
        Certificate.load(tmp_path / "cert.pem")


def test_the_staged_key_is_private_and_gone_afterwards(keys):
    import os
    import stat

    signing = load_signing_key(str(keys["key"]), str(keys["cert"]), "pin-for-test")
    with signing.staged((os.getuid(), os.getgid())) as directory:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o500
        assert sorted(p.name for p in directory.iterdir()) == ["cert.pem", "key.pem", "pin"]
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o400 for p in directory.iterdir())
        assert (directory / "key.pem").read_bytes() == keys["key"].read_bytes()
        staged = directory
    assert not staged.exists()
    shutil.rmtree(staged, ignore_errors=True)
