"""The registry as the fleet's shared cache, with a real registry (Debian's docker-registry) and the
run's real build: pushed once, pulled by a node with an empty cache instead of compiled, verified
again there; a tampered image is refused; a registry that is down or refuses loses nothing."""

import json
import shutil
from pathlib import Path

import docker
import pytest

from tests.helpers import HOSTILE_USERSPACE, STANDINS, make_userspace_hostile, run_cli, run_cli_watched
from tests.registry import LocalRegistry

pytestmark = [pytest.mark.engine, pytest.mark.build]


@pytest.fixture(scope="module")
def image_key(tmp_path_factory):
    """An ECDSA P-256 key pair for --sign-image, as openssl makes one."""
    import subprocess

    base = tmp_path_factory.mktemp("image-key")
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(base / "k")], check=True)
    subprocess.run(["openssl", "ec", "-in", str(base / "k"), "-pubout", "-out", str(base / "k.pub")], check=True,
                   capture_output=True)
    return base / "k", base / "k.pub"


@pytest.fixture(scope="module")
def pushed(build, registry, image_key):
    """The run's build, pushed and signed by the same command with --registry and --sign-image."""
    data, _, cache, _ = build
    result = run_cli("modules", "--kernel", data["kernel_release"], "--driver", data["driver_version"],
                     "--registry", registry.repo(), "--sign-image", str(image_key[0]), "--json",
                     env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def empty_cache(tmp_path: Path) -> Path:
    """A node's new cache; downloads (checked by sha256) are shared to spare the mirror."""
    cache = tmp_path / "node-cache"
    cache.mkdir()
    (cache / "downloads").symlink_to(STANDINS / "downloads", target_is_directory=True)
    return cache


def args_of(data: dict, repo: str) -> list[str]:
    return ["modules", "--kernel", data["kernel_release"], "--driver", data["driver_version"], "--registry", repo,
            "--json"]


def test_a_build_with_registry_pushes_its_modules_image(build, registry, pushed):
    data = build[0]
    said = pushed["registry"]
    assert (said["ref"], said["pushed"]) == (f"{registry.repo()}/modules:{data['modules_image'].split(':', 1)[1]}", True)
    digest = said["digest"]
    assert said["signed"] == [f"{registry.repo()}/modules:{digest.replace(':', '-')}.{kind}" for kind in ("sig", "att")]
    assert 0 < said["bytes_sent"] < sum(m["size"] for m in data["modules"]) + 300e6
    labels = registry.labels(said["ref"])
    manifest = json.loads((Path(data["cache_dir"]) / "manifest.json").read_text())
    assert labels["io.cudabuild.key"] == manifest["key"]
    assert labels["io.cudabuild.kernel-release"] == data["kernel_release"]


@pytest.mark.skipif(shutil.which("cosign") is None, reason="bash scripts/setup installs Debian trixie's cosign")
def test_cosign_verifies_the_real_build_and_its_sbom_names_each_module(build, pushed, image_key):
    import base64
    import subprocess

    data = build[0]
    image = f"{pushed['registry']['ref'].rsplit(':', 1)[0]}@{pushed['registry']['digest']}"
    flags = ["--insecure-ignore-tlog", "--allow-http-registry", "--key", str(image_key[1])]
    signed = subprocess.run(["cosign", "verify", *flags, image], capture_output=True, text=True, timeout=120)
    assert signed.returncode == 0, signed.stderr
    sbom = subprocess.run(["cosign", "verify-attestation", *flags, "--type", "spdxjson", image], capture_output=True,
                          text=True, timeout=120)
    assert sbom.returncode == 0, sbom.stderr
    document = json.loads(base64.b64decode(json.loads(sbom.stdout.splitlines()[0])["payload"]))["predicate"]
    listed = {f["fileName"]: f["checksums"][0]["checksumValue"] for f in document["files"]}
    assert {f"./modules/{m['name']}.ko": m["sha256"] for m in data["modules"]}.items() <= listed.items()
    assert any(p["name"].startswith("nvidia") for p in document["packages"])


def test_an_empty_cache_pulls_and_verifies_instead_of_building(build, registry, pushed, tmp_path):
    data = build[0]
    client = docker.from_env()
    client.images.remove(data["modules_image"], force=True)
    cache = empty_cache(tmp_path)
    result, created = run_cli_watched(*args_of(data, registry.repo()), env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    pulled = json.loads(result.stdout)
    assert pulled["origin"] == "pulled" and pulled["registry"]["pushed"] is False
    assert created == [], "a pull starts no builder container"
    assert any(s["name"].startswith("verify pulled modules") and s["status"] == "done" for s in pulled["steps"])
    assert [m["sha256"] for m in pulled["modules"]] == [m["sha256"] for m in data["modules"]]
    # The same verification a build gets, once more by a user: inspect checks every digest.
    inspected = run_cli("inspect", data["modules_image"], "--json", env={"CUDABUILD_CACHE": str(cache)})
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["kernel_release"] == data["kernel_release"]
    # The registry's name is not left behind on this engine; the modules image is.
    assert client.images.get(data["modules_image"]).labels["io.cudabuild.key"] == \
        json.loads((Path(pulled["cache_dir"]) / "manifest.json").read_text())["key"]
    assert not [t for i in client.images.list() for t in i.tags if t.startswith(registry.host)]


def test_a_docker_pulled_modules_image_works_with_image_modules(build, registry, pushed, tmp_path):
    """As a user who has no cudabuild cache: `docker pull` the modules image, then bake a driver
    image from it. It is read from the image and checked as a pull is (symbol CRCs against Debian's
    Module.symvers of that kernel included), then cached."""
    data = build[0]
    client = docker.from_env()
    ref = pushed["registry"]["ref"]
    client.images.pull(ref)
    cache = empty_cache(tmp_path)
    tag = "cudabuild-test/driver-from-pulled:1"
    try:
        result = run_cli("image", "driver", "--modules", ref, "--tag", tag, "--json", env={"CUDABUILD_CACHE": str(cache)})
        assert result.returncode == 0, result.stderr
        assert "it was not built with this cache" in result.stderr and "symbol CRCs not checked" not in result.stderr
        key = client.images.get(ref).labels["io.cudabuild.key"]
        assert (cache / "results" / key / "manifest.json").is_file()
        assert client.images.get(tag).labels["io.cudabuild.kernel-release"] == data["kernel_release"]
    finally:
        client.images.remove(ref, force=True)
        if any(tag in i.tags for i in client.images.list(name=tag.split(":")[0])):
            client.images.remove(tag, force=True)


def tampered_payload(source: Path, payload: Path, release: str, *, how: str) -> tuple[Path, str]:
    """The build's files changed: a byte of nvidia.ko's vermagic altered, with or without the
    manifest updated to match (digest-mismatch, manifest-rewritten), or the userspace made hostile
    with true digests (HOSTILE_USERSPACE), in a copy at `payload`. The payload, and the name the
    refusal must give."""
    from cudabuild.digests import sha256_file

    shutil.copytree(source, payload, symlinks=True, ignore=shutil.ignore_patterns("build.log"))
    if how in HOSTILE_USERSPACE:
        return payload, make_userspace_hostile(payload, how)
    ko = payload / "modules" / "nvidia.ko"
    ko.chmod(0o644)
    blob = ko.read_bytes()
    changed = release[:-1] + ("X" if release[-1:] != "X" else "Y")
    ko.write_bytes(blob.replace(b"vermagic=" + release.encode(), b"vermagic=" + changed.encode(), 1))
    if how == "manifest-rewritten":
        manifest = json.loads((payload / "manifest.json").read_text())
        for entry in manifest["modules"]:
            if entry["file"] == "nvidia.ko":
                entry["sha256"] = sha256_file(ko)
        (payload / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return payload, "nvidia.ko"


# One of each kind of tampering on the registry's path (a module's bytes, a manifest made to match
# them, a hostile userspace); the other kinds (a libc added with a true digest, a file the manifest
# does not list) are refused by the same check every load runs (artifact.load), which
# tests/integration/test_tampered_userspace.py and tests/unit/test_hostile_input.py try for each.
@pytest.mark.parametrize("how", ["digest-mismatch", "manifest-rewritten", "hostile-soname"])
def test_a_tampered_registry_image_is_refused_and_nothing_lands_in_the_cache(build, registry, pushed, tmp_path, how):
    data = build[0]
    client = docker.from_env()
    original = client.images.get(data["modules_image"])
    labels = {k: v for k, v in original.labels.items() if k.startswith("io.cudabuild.")}
    repo = registry.repo(f"tampered-{how}")
    ref = f"{repo}/modules:{data['modules_image'].split(':', 1)[1]}"
    payload, named = tampered_payload(Path(data["cache_dir"]), tmp_path / "payload", data["kernel_release"],
                                     how=how)
    registry.push_directory(ref, payload, labels)  # the same tag and labels (key included)
    assert registry.labels(ref)["io.cudabuild.key"] == labels["io.cudabuild.key"]

    cache = empty_cache(tmp_path)
    result = run_cli(*args_of(data, repo), env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 7, result.stderr
    assert f"refused the registry's {ref}" in result.stderr
    assert named in result.stderr
    assert ("NVIDIA driver's" in result.stderr if how in HOSTILE_USERSPACE else
            "vermagic" in result.stderr or "sha256" in result.stderr or "changed" in result.stderr)
    assert list((cache / "results").iterdir()) == []
    assert list((cache / "tmp").iterdir()) == []
    assert not [t for i in client.images.list() for t in i.tags if t.startswith(registry.host)]


def test_a_registry_that_does_not_answer_keeps_the_local_result(build, tmp_path):
    data, _, cache, _ = build
    result = run_cli(*args_of(data, "127.0.0.1:9/cudabuild"), env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 9, result.stderr
    assert "the registry 127.0.0.1:9 does not answer" in result.stderr
    assert "the modules are kept here" in result.stderr
    assert docker.from_env().images.get(data["modules_image"])


def test_a_refused_push_keeps_the_local_result(build, tmp_path):
    data, _, cache, _ = build
    with LocalRegistry(tmp_path / "readonly", read_only=True) as readonly:
        result = run_cli(*args_of(data, readonly.repo()), env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 20, result.stderr
    ref = f"{readonly.repo()}/modules:{data['modules_image'].rsplit(':', 1)[1]}"
    assert f"error: the registry {readonly.host} refused the push of {ref.rsplit(':', 1)[0]}" in result.stderr, \
        result.stderr
    assert "the modules are kept here" in result.stderr
    assert (Path(data["cache_dir"]) / "manifest.json").is_file()


def test_no_build_with_a_tag_the_registry_lacks_exits_21(build, registry, tmp_path):
    data = build[0]
    cache = empty_cache(tmp_path)
    result = run_cli("modules", "--kernel", data["kernel_release"], "--driver", "470", "--registry",
                     registry.repo("elsewhere"), "--no-build", env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 21, result.stderr
    assert "--no-build: neither the cache" in result.stderr and "nor the registry" in result.stderr
    assert list((cache / "results").iterdir()) == []


def test_runtime_images_are_pushed_the_same_way_and_signed(build, registry, pushed, image_key):
    import subprocess

    data, _, cache, _ = build
    result = run_cli("image", "device-query", "--modules", data["modules_image"], "--registry", registry.repo(),
                     "--sign-image", str(image_key[0]), "--json", env={"CUDABUILD_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    name, tag = report["registry_ref"].rsplit(":", 1)
    assert name == f"{registry.repo()}/device-query"
    assert tag in registry.tags("cudabuild/device-query")
    assert [t.rsplit(".", 1)[1] for t in report["signed"]] == ["sig", "att"]
    if shutil.which("cosign"):
        checked = subprocess.run(["cosign", "verify", "--key", str(image_key[1]), "--insecure-ignore-tlog",
                                  "--allow-http-registry", report["registry_ref"]], capture_output=True, text=True,
                                 timeout=120)
        assert checked.returncode == 0, checked.stderr
    # The private key is read, never kept: not in anything the registry received in the clear (its
    # manifests, configs, signatures and attestations; the layers are the artifact's files, each
    # checked against the manifest), nor in the cache's logs, blob records and manifests.
    line = image_key[0].read_text().splitlines()[1][:40].encode()  # a fragment of the key's base64
    small = [p for p in registry.base.rglob("*") if p.is_file() and p.stat().st_size < 1 << 20]
    small += [p for d in ("logs", "blobs/layers", "results") for p in (cache / d).rglob("*")
              if p.is_file() and (d != "results" or p.name == "manifest.json")]
    assert len(small) > 5 and not [p for p in small if line in p.read_bytes()]
