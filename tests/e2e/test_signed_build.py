"""Secure Boot with the run's real build: its modules signed with a fresh key by the kernel's own
sign-file, each signature checked by openssl (FACTS.md) and named by modinfo; the key's bytes
nowhere in the cache, the logs, the images' layers or the registry; another certificate is another
build; a changed byte is reported; a signed result pulled elsewhere verifies there."""

import base64
import hashlib
import json
import subprocess
import tarfile
import time
from pathlib import Path

import docker
import pytest

from tests.helpers import STANDINS, make_signing_key, openssl_verifies, run_cli

pytestmark = [pytest.mark.engine, pytest.mark.build]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_signing_key(tmp_path_factory.mktemp("keys"), "cudabuild e2e signing key")


def key_fragments(key: Path) -> list[bytes]:
    """What would betray the key: each line of its PEM body, and its DER bytes in pieces."""
    lines = [line for line in key.read_bytes().splitlines() if line and not line.startswith(b"-----")]
    der = base64.b64decode(b"".join(lines))
    return lines + [der[i:i + 48] for i in range(0, len(der) - 48, 200)]


def leaks(fragments: list[bytes], data: bytes) -> bool:
    return any(fragment in data for fragment in fragments)


def files_under(root: Path):
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield path


@pytest.fixture(scope="module")
def key_given_at() -> float:
    """When the key was first given to cudabuild (before `signed`): a file older cannot hold it."""
    return time.time() - 2  # file times' granularity


@pytest.fixture(scope="module")
def signed(build, keys, key_given_at, tmp_path_factory):
    data, _, cache, _ = build
    output = tmp_path_factory.mktemp("signed") / "nvidia"
    result = run_cli("modules", "--kernel", data["kernel_release"], "--driver", data["driver_version"],
                     "--sign-key", str(keys["key"]), "--sign-cert", str(keys["cert"]), "--output", str(output),
                     "--json", env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout), output, result.stderr


def test_every_module_is_signed_and_verifies_with_openssl(build, signed, keys, tmp_path):
    data, output, stderr = signed
    assert data["origin"] == "built" and "==> sign modules (sha256, the kernel's sign-file)" in stderr
    assert "==> make modules" not in stderr, "signing starts from the unsigned build in the cache"
    for module in sorted((output / "modules").glob("*.ko")):
        assert openssl_verifies(module, keys["cert"], tmp_path), module.name
        signer = subprocess.run(["/sbin/modinfo", "-F", "signer", str(module)], capture_output=True, text=True)
        assert signer.stdout.strip() == keys["subject"], (module.name, signer.stdout, signer.stderr)
    manifest = json.loads((output / "manifest.json").read_text())
    unsigned = json.loads((Path(build[0]["cache_dir"]) / "manifest.json").read_text())
    assert manifest["build_seconds"] < unsigned["build_seconds"], "the signing's own time, not the cached build's"
    cert_sha256 = hashlib.sha256(keys["der"].read_bytes()).hexdigest()
    assert manifest["signature"]["signer"] == keys["subject"]
    assert manifest["signature"]["cert_sha256"] == cert_sha256
    labels = docker.from_env().images.get(data["modules_image"]).labels
    assert labels["io.cudabuild.cert-sha256"] == cert_sha256 and labels["io.cudabuild.signer"] == keys["subject"]
    assert f"-signed.{cert_sha256[:12]}-" in data["modules_image"]


def test_the_key_appears_nowhere(build, signed, keys, key_given_at, tmp_path):
    _, _, cache, _ = build
    data, output, stderr = signed
    fragments = key_fragments(keys["key"])
    assert not leaks(fragments, stderr.encode())
    # Every file in the cache and the output written since the key was first given (a file older
    # than that cannot hold it), among them the signed result, its log and the sign container's work.
    scanned = [p for p in [*files_under(cache), *files_under(output)] if p.stat().st_mtime >= key_given_at]
    assert any(p.name == "build.log" for p in scanned) and any(p.suffix == ".ko" for p in scanned)
    found = [str(p) for p in scanned if leaks(fragments, p.read_bytes())]
    assert found == [], f"the key's bytes are in {found}"
    client = docker.from_env()
    runtime = run_cli("image", "device-query", "--modules", data["modules_image"], "--json",
                      env={"CUDABUILD_CACHE": str(cache)})
    assert runtime.returncode == 0, runtime.stderr
    for image in (data["modules_image"], json.loads(runtime.stdout)["image"]):
        saved = tmp_path / "image.tar"
        with open(saved, "wb") as out:
            for chunk in client.images.get(image).save(named=False):
                out.write(chunk)
        # The last layer (a modules image's modules layer, which signing changes: its userspace layer
        # is the unsigned build's, byte for byte; the one layer a runtime image adds to its base,
        # whose layers were made before the key existed) and the image's configuration.
        with tarfile.open(saved) as tar:
            [manifest] = json.loads(tar.extractfile("manifest.json").read())
            for member in (manifest["Layers"][-1], manifest["Config"]):
                assert not leaks(fragments, tar.extractfile(member).read()), f"the key's bytes are in {image}"
        saved.unlink()


def test_the_driver_container_checks_the_signatures_itself(build, signed, keys):
    data, _, cache, _ = build
    made = run_cli("image", "driver", "--modules", signed[0]["modules_image"], "--json",
                   env={"CUDABUILD_CACHE": str(cache)})
    assert made.returncode == 0, made.stderr[-3000:]
    image = json.loads(made.stdout)["image"]
    check = ("from pathlib import Path; from cudabuild import artifact; "
             "a = artifact.load(Path('/opt/cudabuild/artifact')); print(a.manifest.signature['signer'])")
    out = docker.from_env().containers.run(image, entrypoint=["python3", "-c", check], remove=True, network_mode="none")
    assert out.decode().strip() == keys["subject"]


def test_another_certificate_is_another_build(build, signed, tmp_path):
    data, _, cache, _ = build
    other = make_signing_key(tmp_path / "other", "another signing key")
    result = run_cli("modules", "--kernel", data["kernel_release"], "--driver", data["driver_version"],
                     "--sign-key", str(other["key"]), "--sign-cert", str(other["cert"]), "--json",
                     env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads(result.stdout)
    assert again["cache_hit"] is False and again["cache_dir"] != signed[0]["cache_dir"]
    assert again["modules_image"] != signed[0]["modules_image"]
    # One changed byte in the cache: inspect --verify reports it, and the next use refuses it.
    ko = Path(again["cache_dir"]) / "modules" / "nvidia-drm.ko"
    blob = bytearray(ko.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    ko.write_bytes(bytes(blob))
    inspected = run_cli("inspect", again["modules_image"], "--verify", env={"CUDABUILD_CACHE": str(cache)})
    assert inspected.returncode == 3, inspected.stdout + inspected.stderr
    assert "nvidia-drm.ko has sha256" in inspected.stderr
    reused = run_cli("modules", "--kernel", data["kernel_release"], "--driver", data["driver_version"],
                     "--sign-key", str(other["key"]), "--sign-cert", str(other["cert"]),
                     env={"CUDABUILD_CACHE": str(cache)})
    assert reused.returncode == 3 and "changed after it was built" in reused.stderr


def test_a_signed_result_goes_through_a_registry_without_the_key(build, signed, keys, registry, tmp_path):
    data, _, cache, _ = build
    base = ["modules", "--kernel", data["kernel_release"], "--driver", data["driver_version"], "--registry",
            registry.repo(), "--json"]
    pushed = run_cli(*base, "--sign-key", str(keys["key"]), "--sign-cert", str(keys["cert"]),
                     env={"CUDABUILD_CACHE": str(cache)})
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert json.loads(pushed.stdout)["registry"]["pushed"] is True
    fragments = key_fragments(keys["key"])
    assert [str(p) for p in files_under(registry.base) if leaks(fragments, p.read_bytes())] == []
    # Another machine: an empty cache, the certificate alone, never a build.
    node = tmp_path / "node"
    node.mkdir()
    (node / "downloads").symlink_to(STANDINS / "downloads", target_is_directory=True)
    docker.from_env().images.remove(signed[0]["modules_image"], force=True)
    pulled = run_cli(*base, "--sign-cert", str(keys["der"]), "--no-build", env={"CUDABUILD_CACHE": str(node)})
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    result = json.loads(pulled.stdout)
    assert result["origin"] == "pulled"
    inspected = run_cli("inspect", result["cache_dir"], "--json", env={"CUDABUILD_CACHE": str(node)})
    assert json.loads(inspected.stdout)["signed"]["signer"] == keys["subject"]
