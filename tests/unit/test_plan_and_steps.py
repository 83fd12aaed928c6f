"""compile/plan.py and compile/steps.py against a fake engine (tests/unit/fake_engine.py) and a
fake Debian archive: what the plan resolves and says, when it asks for the engine, and how an
outside build is taken in (artifact.admit) or refused with nothing left behind."""

from __future__ import annotations

import pytest

from cudabuild.artifact import LABEL_PREFIX
from cudabuild.compile import plan as plan_module
from cudabuild.compile import steps
from cudabuild.errors import InputError, VerifyError
from cudabuild.settings import Services, Settings
from cudabuild.sources.debian import Package
from cudabuild.ui import Reporter
from tests.elf import write_artifact
from tests.unit.fake_engine import FakeEngine

TRIXIE = "6.12.117+deb13-amd64"


def _pkg(name: str, version: str = "1") -> Package:
    return Package(name=name, version=version, filename=f"pool/{name}_{version}.deb", sha256=f"{abs(hash(name)):064x}"[:64],
                   size=1, base_url="http://deb.example/debian", suite="trixie")


class FakeArchive:
    """The two questions a plan asks Debian's archive, answered from a table."""

    driver_backports = False

    def __init__(self, *, gcc: int | None = 14, **_) -> None:
        self.gcc = gcc

    def latest_kernel(self, flavour: str = "amd64") -> str:
        return TRIXIE

    def kernel_packages(self, release: str):
        return [_pkg(f"linux-headers-{release}"), _pkg("linux-kbuild-6.12")], self.gcc

    def driver_packages(self, request, flavor, release):
        return _pkg("nvidia-kernel-source", "550.163.01-2"), [_pkg("libcuda1", "550.163.01-2")], "550.163.01"

    def versions(self, name, backports=False):
        return []


@pytest.fixture
def services(tmp_path, monkeypatch):
    def make(*, gcc: int | None = 14):
        monkeypatch.setattr(plan_module, "DebianArchive", lambda **kw: FakeArchive(gcc=gcc))
        settings = Settings(cache_dir=tmp_path / "cache", cpu_count=2, host_release="6.1.0-56-amd64")
        engine = FakeEngine()
        return Services(settings, reporter=Reporter(quiet=True), engine=engine), engine
    return make


def test_a_plan_resolves_the_distribution_flavour_and_builder_from_the_release(services):
    made, engine = services()
    plan = plan_module.plan_modules(Settings().build_options({"kernel": TRIXIE}), made)
    assert plan.options.distribution == "trixie"  # +deb13: the release says so
    assert plan.spec.flavor == "proprietary"  # 550: the default before 560
    assert plan.spec.driver_version == "550.163.01"
    assert plan.builder.base == "debian:trixie"  # gcc 14, the kernel's own compiler
    assert plan.tag == "cudabuild/modules:550.163.01-6.12.117_deb13-amd64"
    assert ("ensure_image", "debian:trixie") in engine.calls
    again = plan_module.plan_modules(Settings().build_options({"kernel": TRIXIE}), made)
    assert again.key == plan.key, "the same inputs plan the same key"
    fewer = plan_module.plan_modules(Settings().build_options({"kernel": TRIXIE, "only_modules": "nvidia"}), made)
    assert fewer.key != plan.key and fewer.spec.modules == ("nvidia",)


def test_a_plan_refuses_a_kernel_without_a_known_compiler_before_asking_for_the_engine(services):
    made, engine = services(gcc=99)
    with pytest.raises(InputError, match="gcc 99"):
        plan_module.plan_modules(Settings().build_options({"kernel": TRIXIE}), made)
    assert engine.calls == [], "the engine is asked for only once every input has been checked"


def _outside_image(tmp_path, engine: FakeEngine, *, key_label: str | None = None):
    """A modules image made elsewhere, as the engine holds it, with the labels its manifest gives."""
    from cudabuild.artifact import load

    root = write_artifact(tmp_path / "made-elsewhere", release="4.3.6-coreos")
    manifest = load(root).manifest
    labels = manifest.labels()
    if key_label is not None:
        labels[f"{LABEL_PREFIX}.key"] = key_label
    engine.add("team/modules:elsewhere", labels=labels, layer=root)
    from cudabuild.artifact import read_labels

    return read_labels(labels, "team/modules:elsewhere"), manifest


def test_an_outside_image_is_admitted_into_the_cache(tmp_path, services):
    made, engine = services()
    labels, manifest = _outside_image(tmp_path, engine)
    checked = steps.import_image("team/modules:elsewhere", labels, made)
    assert checked.root == made.cache.result_dir(manifest.key)
    assert checked.manifest.modules == manifest.modules
    assert ("save", "team/modules:elsewhere") in engine.calls
    assert list((made.cache.root / "tmp").glob("import-*")) == [], "the work directory is removed"


def test_an_outside_image_whose_labels_name_another_build_is_refused_and_nothing_is_kept(tmp_path, services):
    made, engine = services()
    labels, manifest = _outside_image(tmp_path, engine, key_label="b" * 64)
    with pytest.raises(VerifyError, match="refused team/modules:elsewhere: its labels describe another build"):
        steps.import_image("team/modules:elsewhere", labels, made)
    assert made.cache.result(manifest.key) is None and made.cache.result("b" * 64) is None
    assert list((made.cache.root / "tmp").glob("import-*")) == []


def test_a_registry_image_of_another_build_is_refused_and_nothing_is_kept(tmp_path, services):
    """The registry (here a bundle on disk, read by the same code) answered for this plan's key with
    an image whose manifest is another build: refused by artifact.admit's `expect`, before any
    symbol is read; nothing is kept in the cache, and the engine is not asked."""
    from cudabuild.artifact import load
    from cudabuild.compile.publish import push_modules
    from cudabuild.registry import OciLayout

    made, engine = services()
    plan = plan_module.plan_modules(Settings().build_options({"kernel": TRIXIE}), made)
    elsewhere = load(write_artifact(tmp_path / "made-elsewhere", release="4.3.6-coreos"))
    store = OciLayout(f"oci:{tmp_path / 'bundle'}", create=True)
    remote = f"{store.repo}/modules:x"
    pushed = push_modules(store, elsewhere, remote, cache=made.cache, reporter=made.reporter)
    assert store.resolve(remote).digest == pushed.digest
    calls = list(engine.calls)
    with pytest.raises(VerifyError, match="refused the registry's .*modules:x: its manifest describes another build"):
        steps.pull_verified(plan, store, remote, reporter=made.reporter)
    assert made.cache.result(plan.key) is None and made.cache.result(elsewhere.manifest.key) is None
    assert engine.calls == calls, "a pull goes over the store's API, not through the engine"
    assert list((made.cache.root / "tmp").glob("pull-*")) == []


def test_labels_that_name_another_digest_for_a_module_are_refused_naming_it(tmp_path):
    from cudabuild.artifact import load, read_labels
    from cudabuild.artifact.admit import labels_match

    manifest = load(write_artifact(tmp_path / "a", release="4.3.6-coreos")).manifest
    raw = manifest.labels()
    assert labels_match(read_labels(raw, "x"), manifest) is None
    raw[f"{LABEL_PREFIX}.modules"] = ",".join(f"{item.split('@')[0]}@sha256:{'f' * 64}" if item.startswith("nvidia.ko@")
                                             else item for item in raw[f"{LABEL_PREFIX}.modules"].split(","))
    with pytest.raises(VerifyError, match="nvidia.ko's sha256 differs"):
        labels_match(read_labels(raw, "x"), manifest)
    with pytest.raises(VerifyError, match="has no io.cudabuild labels"):
        labels_match(None, manifest)


def test_an_encrypted_image_key_needs_its_passphrase_and_a_wrong_kind_of_key_is_named(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from cudabuild.registry.trust import load_signing_key

    key = ec.generate_private_key(ec.SECP256R1())
    locked = tmp_path / "locked.pem"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"s3cret")))
    with pytest.raises(InputError, match="is encrypted: set its passphrase in CUDABUILD_IMAGE_KEY_PASSWORD"):
        load_signing_key(str(locked))
    with pytest.raises(InputError, match="passphrase .* is wrong"):
        load_signing_key(str(locked), passphrase="wrong")
    assert load_signing_key(str(locked), passphrase="s3cret").private_numbers() == key.private_numbers()
    other = tmp_path / "rsa.pem"
    other.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(InputError, match="not an ECDSA P-256 key"):
        load_signing_key(str(other))


def test_a_signature_by_another_key_and_a_provenance_that_contradicts_the_labels_are_refused(tmp_path):
    """trust.verify_image against a bundle on disk: the signing and checking code, no registry."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from cudabuild.artifact import load
    from cudabuild.artifact.image import config_of
    from cudabuild.errors import TrustError
    from cudabuild.registry import OciLayout
    from cudabuild.registry.trust import PROVENANCE, provenance, sign_image, statement, verify_image

    checked = load(write_artifact(tmp_path / "a", release="4.3.6-coreos"))
    store = OciLayout(f"oci:{tmp_path / 'bundle'}", create=True)
    ref = f"{store.repo}/modules:x"
    digest = store.push(ref, config_of(checked.manifest.labels(), []), [])
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(TrustError, match="is not signed"):
        verify_image(store, store.resolve(ref), key.public_key())
    said = provenance(checked.manifest, options={}, started=None, finished=None)
    sign_image(store, ref, digest, other, [statement(digest, "x", PROVENANCE, said)])
    with pytest.raises(TrustError, match="not signed by this key"):
        verify_image(store, store.resolve(ref), key.public_key())
    said["buildDefinition"]["externalParameters"]["flavor"] = "open"
    sign_image(store, ref, digest, key, [statement(digest, "x", PROVENANCE, said)])
    with pytest.raises(TrustError, match="contradicts its labels: flavor is 'open'"):
        verify_image(store, store.resolve(ref), key.public_key())
    said["buildDefinition"]["externalParameters"]["flavor"] = checked.manifest.flavor
    sign_image(store, ref, digest, key, [statement(digest, "x", PROVENANCE, said)])
    assert verify_image(store, store.resolve(ref), key.public_key()).digest == digest
