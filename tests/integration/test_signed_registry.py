"""The fleet's registry, small and trusted (issue 33), against a real registry on 127.0.0.1 (Debian's
docker-registry), the real cosign (Debian trixie's 2.5.0, offline), skopeo, and a fake host root with
the stub insmod. Two kernels' builds of one driver (small real artifacts: gcc-made modules with each
kernel's vermagic) are pushed by cudabuild's own push, signed with --sign-image's code:

- the userspace layer is one blob for both kernels, and the second push sends only its modules;
- cosign accepts the signature and both attestations with the key, and refuses another key's;
- a node with --verify-key takes a signed build, and refuses an unsigned one, another key's, and one
  whose signed provenance contradicts its labels (exit 27), before any layer is fetched;
- a bundle written from the registry serves install and stage with the registry stopped, skopeo
  reads it, and the next kernel's userspace is linked from what the node already holds."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from cudabuild.artifact import image_tag, load
from cudabuild.artifact.image import LAYER_TITLE, MODULES_LAYER, USERSPACE_LAYER
from cudabuild.compile.publish import keep_references, push_modules
from cudabuild.registry import Registry
from cudabuild.registry.trust import PROVENANCE, SPDX, load_signing_key, provenance, sign_image, statement
from cudabuild.settings import Settings
from cudabuild.store.cache import Cache
from cudabuild.ui import Reporter
from tests.helpers import DRIVER, make_artifact, run_cli
from tests.integration.test_kernel_updates import host_for
from tests.registry import LocalRegistry

RUNNING = "6.1.0-47-amd64"
NEXT = "6.1.0-56-amd64"
COSIGN = shutil.which("cosign")
pytestmark = pytest.mark.skipif(COSIGN is None, reason="bash scripts/setup installs Debian trixie's cosign")


def keypair(directory: Path, name: str) -> tuple[Path, Path]:
    key, pub = directory / f"{name}.key", directory / f"{name}.pub"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True)
    subprocess.run(["openssl", "ec", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    return key, pub


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A registry holding RUNNING's and NEXT's builds of one driver, pushed and signed by cudabuild."""
    base = tmp_path_factory.mktemp("signed-registry")
    key, pub = keypair(base, "fleet")
    _, other_pub = keypair(base, "other")
    options = Settings().build_options({"sign_image": str(key)})
    cache = Cache(base / "cache")
    for release in (RUNNING, NEXT):
        make_artifact(base / release, release=release, driver=DRIVER)
    # The driver's kernel-independent object, as a build keeps it from the driver's tree: here the
    # first kernel's nvidia.ko stands in for NVIDIA's nv-kernel.o_binary (most of a real nvidia.ko).
    tree = base / "driver-tree" / "nvidia"
    tree.mkdir(parents=True)
    shutil.copyfile(base / RUNNING / "modules" / "nvidia.ko", tree / "nv-kernel.o_binary")
    keep_references(cache, load(base / RUNNING).manifest, tree.parent)
    with LocalRegistry(base / "registry") as registry:
        pushed = {}
        for release in (RUNNING, NEXT):
            checked = load(base / release)
            ref = f"{registry.repo()}/{image_tag('modules', DRIVER, 'proprietary', release)}"
            pushed[release] = (ref, push_modules(Registry(registry.repo()), checked, ref, cache=cache,
                                                 reporter=Reporter(quiet=True), options=options), checked)
        yield {"registry": registry, "pushed": pushed, "key": key, "pub": pub, "other_pub": other_pub, "base": base}


def cosign(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([COSIGN, *args, "--insecure-ignore-tlog", "--allow-http-registry"], capture_output=True,
                          text=True, timeout=120)


def test_two_kernels_share_the_userspace_layer_and_the_second_push_sends_only_its_modules(fleet):
    store = Registry(fleet["registry"].repo())
    first_ref, first, _ = fleet["pushed"][RUNNING]
    second_ref, second, _ = fleet["pushed"][NEXT]
    layers = {}
    for release, ref in ((RUNNING, first_ref), (NEXT, second_ref)):
        manifest = store.resolve(ref).manifest
        layers[release] = {d["annotations"][LAYER_TITLE]: d for d in manifest["layers"]}
        assert [d["annotations"][LAYER_TITLE] for d in manifest["layers"]] == [USERSPACE_LAYER, MODULES_LAYER]
        assert all(d["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip" for d in manifest["layers"])
    assert layers[RUNNING][USERSPACE_LAYER]["digest"] == layers[NEXT][USERSPACE_LAYER]["digest"]
    # The modules are stored against the driver's reference object, which the shared layer carries.
    import gzip
    import io
    import tarfile

    def members(digest: str) -> list[str]:
        blob = store.blob_bytes("cudabuild/modules", digest)
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
            return tar.getnames()

    assert "reference/nv-kernel.o_binary" in members(layers[NEXT][USERSPACE_LAYER]["digest"])
    assert "modules/nvidia.ko.zst" in members(layers[NEXT][MODULES_LAYER]["digest"])
    assert layers[RUNNING][MODULES_LAYER]["digest"] != layers[NEXT][MODULES_LAYER]["digest"]
    found = store.resolve(second_ref)
    config = found.manifest["config"]["size"]
    assert second.bytes_sent == layers[NEXT][MODULES_LAYER]["size"] + config + len(found.raw), \
        "the second kernel's push sends its modules layer, its config and its manifest, nothing else"
    found = store.resolve(first_ref)
    assert first.bytes_sent == sum(d["size"] for d in layers[RUNNING].values()) + found.manifest["config"]["size"] \
        + len(found.raw), "the first push sent both layers"


def test_cosign_accepts_the_signature_and_attestations_and_refuses_another_key(fleet):
    ref, pushed, _ = fleet["pushed"][NEXT]
    image = f"{ref.rsplit(':', 1)[0]}@{pushed.digest}"
    good = cosign("verify", "--key", str(fleet["pub"]), image)
    assert good.returncode == 0, good.stderr
    [claim] = json.loads(good.stdout)
    assert claim["critical"]["image"]["docker-manifest-digest"] == pushed.digest
    bad = cosign("verify", "--key", str(fleet["other_pub"]), image)
    assert bad.returncode != 0 and "no matching signatures" in bad.stderr
    import base64

    for kind, predicate_type in (("slsaprovenance1", PROVENANCE), ("spdxjson", SPDX)):
        said = cosign("verify-attestation", "--key", str(fleet["pub"]), "--type", kind, image)
        assert said.returncode == 0, said.stderr
        [envelope] = [json.loads(line) for line in said.stdout.splitlines() if line.strip()]
        stated = json.loads(base64.b64decode(envelope["payload"]))
        assert stated["predicateType"] == predicate_type
        assert stated["subject"][0]["digest"]["sha256"] == pushed.digest.split(":", 1)[1]
        if kind == "slsaprovenance1":
            params = stated["predicate"]["buildDefinition"]["externalParameters"]
            assert (params["kernelRelease"], params["driverVersion"]) == (NEXT, DRIVER)
        else:
            files = {f["fileName"] for f in stated["predicate"]["files"]}
            assert {"./modules/nvidia.ko", f"./userspace/lib/libcuda.so.{DRIVER}"} <= files
            assert stated["predicate"]["spdxVersion"] == "SPDX-2.3"
        refused = cosign("verify-attestation", "--key", str(fleet["other_pub"]), "--type", kind, image)
        assert refused.returncode != 0


def pulled_nothing(host: Path) -> bool:
    top = host / "var/lib/cudabuild"
    return not any((top / "layers").rglob("*.so*")) and not any((top / "staged").rglob("*.ko"))


def test_a_node_with_verify_key_takes_a_signed_build_and_refuses_another_keys(fleet, tmp_path):
    repo = fleet["registry"].repo()
    host, env = host_for(tmp_path / "refuses")
    refused = run_cli("install", "--root", str(host), "--registry", repo, "--driver", "535", "--verify-key",
                      str(fleet["other_pub"]), "--no-fallback", env=env)
    assert refused.returncode == 27, refused.stderr  # the only candidate, refused by its signature
    assert "is not signed by this key" in refused.stderr and pulled_nothing(host)
    host, env = host_for(tmp_path / "takes")
    taken = run_cli("install", "--root", str(host), "--registry", repo, "--driver", "535", "--verify-key",
                    str(fleet["pub"]), "--json", env=env)
    assert taken.returncode == 0, taken.stderr
    saved = json.loads((host / "var/lib/cudabuild/node.json").read_text())
    assert saved["verify_key"] == fleet["pub"].read_text(), "the key is the node's policy from now on"


def test_an_unsigned_image_and_a_contradicting_provenance_are_refused_before_unpacking(fleet, tmp_path):
    registry = fleet["registry"]
    unsigned = f"{registry.repo()}/modules:unsigned"
    manifest = make_artifact(tmp_path / "unsigned", release=RUNNING)
    registry.push_directory(unsigned, tmp_path / "unsigned", manifest.labels())
    key = load_signing_key(str(fleet["key"]))
    # Signed by the fleet's key, but its provenance names another kernel than its labels.
    lying = f"{registry.repo()}/modules:lying"
    other = make_artifact(tmp_path / "lying", release=RUNNING, key="c" * 64)
    digest = registry.push_directory(lying, tmp_path / "lying", other.labels())
    said = provenance(other, options={}, started=None, finished=None)
    said["buildDefinition"]["externalParameters"]["kernelRelease"] = NEXT
    store = Registry(registry.repo())
    sign_image(store, lying, digest, key, [statement(digest, lying.rsplit(":", 1)[0], PROVENANCE, said)])
    env = {"CUDABUILD_CACHE": str(tmp_path / "cache")}
    for ref, reason in ((unsigned, "is not signed"), (lying, "provenance contradicts its labels: kernel-release")):
        result = run_cli("image", "device-query", "--modules", ref, "--verify-key", str(fleet["pub"]), "--no-push",
                         env=env)
        assert result.returncode == 27, result.stderr
        assert reason in result.stderr and "fix:" in result.stderr
        assert not (tmp_path / "cache" / "results").exists() or not any((tmp_path / "cache" / "results").iterdir())
        assert not (tmp_path / "cache" / "layers").exists(), "no layer was fetched"


def test_an_image_of_the_one_layer_format_before_is_still_staged(tmp_path):
    with LocalRegistry(tmp_path / "registry") as registry:
        make_artifact(tmp_path / "old", release=NEXT)
        ref = f"{registry.repo()}/{image_tag('modules', DRIVER, 'proprietary', NEXT)}"
        registry.push_directory(ref, tmp_path / "old", load(tmp_path / "old").manifest.labels(), one_layer=True)
        assert len(Registry(registry.repo()).resolve(ref).manifest["layers"]) == 1
        host, env = host_for(tmp_path)
        staged = run_cli("stage", "--kernel", NEXT, "--root", str(host), "--registry", registry.repo(), "--driver",
                         "535", "--json", env=env)
    assert staged.returncode == 0, staged.stderr
    assert (Path(json.loads(staged.stdout)["path"]) / "modules/nvidia.ko").is_file()


def test_a_bundle_serves_install_and_stage_with_the_registry_stopped_and_skopeo_reads_it(fleet, tmp_path):
    base = fleet["base"]
    bundle = tmp_path / "bundle"
    with LocalRegistry(tmp_path / "registry") as registry:  # its own, stopped before the bundle is used
        for release in (RUNNING, NEXT):
            _, _, checked = fleet["pushed"][release]
            ref = f"{registry.repo()}/{image_tag('modules', DRIVER, 'proprietary', release)}"
            push_modules(Registry(registry.repo()), checked, ref, cache=Cache(base / "cache"),
                         reporter=Reporter(quiet=True), options=Settings().build_options({"sign_image": str(fleet["key"])}))
        made = run_cli("bundle", "--registry", registry.repo(), "--drivers", "535", "--output", str(bundle), "--json")
        assert made.returncode == 0, made.stderr
    said = json.loads(made.stdout)
    assert [(i["signature"], i["attestations"]) for i in said["images"]] == [(True, True), (True, True)]
    assert {"oci-layout", "index.json", "blobs"} <= {p.name for p in bundle.iterdir()}
    tag = image_tag("modules", DRIVER, "proprietary", RUNNING).split(":", 1)[1]
    inspected = subprocess.run(["skopeo", "inspect", f"oci:{bundle}:modules:{tag}"], capture_output=True, text=True,
                               timeout=60)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Labels"]["io.cudabuild.kernel-release"] == RUNNING

    host, env = host_for(tmp_path)
    first = run_cli("install", "--root", str(host), "--registry", f"oci:{bundle}", "--driver", "535",
                    "--verify-key", str(fleet["pub"]), "--json", env=env)
    assert first.returncode == 0, first.stderr
    state = json.loads((host / "run/cudabuild/driver/ready").read_text())
    assert (state["kernel"], state["source"]) == (RUNNING, "registry")
    (host / "boot" / f"vmlinuz-{NEXT}").write_bytes(b"kernel")
    staged = run_cli("stage", "--kernel", "next", "--root", str(host), "--json", env=env)
    assert staged.returncode == 0, staged.stderr
    # The next kernel's userspace is the one the node already held: linked, not fetched again.
    libs = [Path(p) / f"userspace/lib/libcuda.so.{DRIVER}" for p in (
        json.loads(staged.stdout)["path"], *(str(d) for d in (host / "var/lib/cudabuild/staged" / RUNNING).iterdir()))]
    assert libs[0].stat().st_ino == libs[1].stat().st_ino
    assert not (libs[0].parents[2] / "reference").exists(), "the reference objects are not part of a staged build"
    assert list((host / "var/lib/cudabuild/layers/sha256").glob("*/reference/nv-kernel.o_binary")), \
        "the node keeps them with the userspace, for the next kernel's modules"


def test_userspace_layers_no_staged_build_links_are_pruned(tmp_path):
    import os

    from cudabuild.host.root import HostRoot
    from cudabuild.node.staging import LAYERS, prune_layers

    layers = tmp_path / LAYERS / "sha256"
    for name in ("a" * 64, "b" * 64):
        (layers / name / "userspace/lib").mkdir(parents=True)
        (layers / name / "userspace/lib/libcuda.so.1").write_bytes(b"x")
    staged = tmp_path / "var/lib/cudabuild/staged/6.1.0-56-amd64/build/userspace/lib"
    staged.mkdir(parents=True)
    os.link(layers / ("b" * 64) / "userspace/lib/libcuda.so.1", staged / "libcuda.so.1")
    prune_layers(HostRoot(tmp_path))
    assert sorted(p.name for p in layers.iterdir()) == ["b" * 64], "only the layer a staged build links is kept"
