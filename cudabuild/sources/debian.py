"""Debian's archive as a source of kernel headers, NVIDIA module sources and their userspace.

The host reads the archive's Packages indices (kept, filtered, in the cache and refreshed when
older than a few hours), resolves what to fetch, and downloads the .debs by content. Nothing
here needs apt or a Debian host."""

from __future__ import annotations

import json
import lzma
import shutil
import re
import time
from dataclasses import dataclass
from pathlib import Path
from functools import cmp_to_key

from debian.deb822 import Packages, PkgRelation
from debian.debian_support import version_compare

from cudabuild.store.cache import WRITE_MARGIN_BYTES, Cache, key_of, require_space, writing
from cudabuild.errors import FetchError, InputError, VerifyError
from cudabuild.store.fetch import Fetcher
from cudabuild.nvidia import DEBIAN_RELEASE_RE, version_tuple
from cudabuild.ui import Reporter

@dataclass(frozen=True, kw_only=True)
class Package:
    """One .deb of Debian's archive, as its Packages index describes it."""

    name: str
    version: str
    filename: str
    sha256: str
    size: int
    base_url: str
    depends: str = ""
    suite: str = ""  # the suite whose index lists it (bookworm-backports' packages are never "latest")

    @property
    def url(self) -> str:
        return f"{self.base_url.rstrip('/')}/{self.filename}"

    @property
    def upstream_version(self) -> str:
        version = self.version.split(":", 1)[-1]
        return version.rsplit("-", 1)[0] if "-" in version else version



COMPONENTS = ("main", "contrib", "non-free", "non-free-firmware")
ARCH = "amd64"
INDEX_MAX_AGE = 6 * 3600
INDEX_FORMAT = 3  # what the filtered index keeps; another format is read again
INDEX_SPACE_BYTES = 64 * 1024**2  # the filtered index is a few MB; checked before anything is fetched
_KEEP = re.compile(rb"^Package: (linux-headers-|linux-image-|linux-kbuild-|nvidia-|libnvidia-|libcuda|firmware-nvidia)",
                   re.M)

# Gentoo's tested ceilings (FACTS.md): the newest kernel (major, minor) each driver release builds for.
DRIVER_KERNEL_CEILING: list[tuple[tuple[int, ...], tuple[int, int]]] = [
    ((352, 79), (4, 3)),
    ((367, 57), (4, 7)),
    ((384, 111), (4, 14)),
    ((390, 157), (6, 1)),
    ((440, 100), (5, 7)),
    ((450, 119, 3), (5, 12)),
    ((470, 256, 2), (6, 9)),
    ((535, 216, 1), (6, 11)),
    ((550, 144, 3), (6, 13)),
    # Debian's own packages, by the newest kernel their changelogs fix the build for (FACTS.md,
    # "Debian 13 trixie"): trixie's 550 to 6.15, its tesla-535 to 6.16.
    ((550, 163, 1), (6, 15)),
    ((535, 274, 2), (6, 16)),
]
# What to say where no driver of a distribution supports a kernel: NVIDIA's current branches do.
NEWER_DRIVER_HINT = ("NVIDIA's installer of a current branch supports it: --driver-source run --driver 580.142 "
                     "(R580, long-term support) or --driver 595.45.04")


def _known_ceiling(dv: tuple[int, ...]) -> tuple[tuple[int, int] | None, bool]:
    """The newest kernel (major, minor) the table knows a driver to build for: its branch's, else
    that of the drivers older than it (None: none is older); and whether its branch is in the table."""
    same_branch = [ceiling for version, ceiling in DRIVER_KERNEL_CEILING if version[0] == dv[0]]
    older = [ceiling for version, ceiling in DRIVER_KERNEL_CEILING if version < dv]
    found = same_branch or older
    return (max(found) if found else None), bool(same_branch)


def kernel_supported(driver: str, kernel_release: str) -> bool:
    """Whether a driver is known to build for a kernel; drivers newer than the table are assumed to."""
    dv, kv = version_tuple(driver), version_tuple(kernel_release)[:2]
    ceiling, branch_known = _known_ceiling(dv)
    if branch_known:
        return kv <= ceiling
    return ceiling is None or kv <= ceiling or dv > max(v for v, _ in DRIVER_KERNEL_CEILING)


@dataclass(frozen=True)
class DriverNames:
    """Package names of one driver flavour in Debian: `prefix` is '' or 'tesla-470-'."""

    prefix: str
    source: str

    @property
    def required_userspace(self) -> list[str]:
        p = self.prefix
        return ["libcuda1" if not p else f"libnvidia-{p}cuda1", f"libnvidia-{p}ml1",
                f"libnvidia-{p}ptxjitcompiler1", f"nvidia-{p}smi"]

    @property
    def optional_userspace(self) -> list[str]:
        p = self.prefix
        names = [f"libnvidia-{p}nvvm4", f"libnvidia-{p}cfg1", f"libnvidia-{p}allocator1",
                 f"firmware-nvidia-{p}gsp"]
        return names + (["libnvidia-pkcs11-openssl3"] if not p else [])


_SOURCE_RE = {
    "proprietary": re.compile(r"nvidia-(tesla-\d+-)?kernel-source"),
    "open": re.compile(r"nvidia-(tesla-\d+-)?open-kernel-source"),
}
_HEADERS_PREFIX = "linux-headers-"
# The compiler a headers package names: bookworm's linux-compiler-gcc-12-x86, trixie's gcc-14, the
# 7.x kernels' gcc-15-for-host.
_COMPILER_RE = re.compile(r"linux-compiler-gcc-(\d+)-x86|gcc-(\d+)(?:-for-host)?")


class DebianArchive:
    def __init__(self, *, cache: Cache, fetcher: Fetcher, reporter: Reporter, mirror: str,
                 security_mirror: str, distribution: str, refresh: bool = False,
                 driver_backports: bool = False) -> None:
        self.cache = cache
        self.fetcher = fetcher
        self.reporter = reporter
        self.distribution = distribution
        # The suite, its updates and its security updates; and its backports, where newer kernels
        # live for it (a bookworm host that runs 6.12.95+deb12-amd64 finds its headers there),
        # never taken for "latest".
        self.sources = [(mirror, distribution), (mirror, f"{distribution}-updates"),
                        (security_mirror, f"{distribution}-security"), (mirror, f"{distribution}-backports")]
        self.refresh = refresh
        self.driver_backports = driver_backports  # drivers from DIST-backports too (--backports)
        self._packages: dict[str, list[Package]] | None = None

    # ---- the index -------------------------------------------------------------------------
    @property
    def _index_path(self):
        return self.cache.index / f"debian-{key_of([INDEX_FORMAT, self.sources])[:16]}.json"

    def packages(self) -> dict[str, list[Package]]:
        if self._packages is None:
            path = self._index_path
            fresh = path.is_file() and time.time() - path.stat().st_mtime < INDEX_MAX_AGE
            if self.refresh or not fresh:
                try:
                    self._download_index(path)
                except FetchError as exc:
                    if not path.is_file():
                        raise
                    self.reporter.warn(f"could not refresh Debian's package index ({exc.message}); "
                                       "using the copy in the cache")
            raw = json.loads(path.read_text())
            by_name: dict[str, list[Package]] = {}
            for entry in raw["packages"]:
                by_name.setdefault(entry["name"], []).append(Package(**entry))
            self._packages = by_name
        return self._packages

    def _download_index(self, path) -> None:
        require_space(path.parent, INDEX_SPACE_BYTES, "Debian's package index")
        self.reporter.note(f"reading Debian's package index ({', '.join(s for _, s in self.sources)})")
        entries: list[dict] = []
        found = 0
        for base, suite in self.sources:
            for component in COMPONENTS:
                url = f"{base.rstrip('/')}/dists/{suite}/{component}/binary-{ARCH}/Packages.xz"
                data = self.fetcher.get_bytes(url)
                if data is None:
                    continue
                found += 1
                entries.extend(_parse_packages(lzma.decompress(data), base, suite))
        if not found:
            raise FetchError(f"no Packages index found for {self.distribution} at {self.sources[0][0]}",
                             hint="check --apt-mirror and --distribution")
        text = json.dumps({"sources": self.sources, "packages": entries})
        require_space(path.parent, len(text) + WRITE_MARGIN_BYTES, "Debian's package index")
        with writing(path.with_suffix(".tmp")) as tmp:
            tmp.write_text(text)
            tmp.replace(path)

    def versions(self, name: str, *, backports: bool = False) -> list[Package]:
        """All versions of a package, newest first: from the suite, its updates and security updates;
        with `backports`, from its backports too (a kernel found only there, with what it needs)."""
        found = [p for p in self.packages().get(name, []) if backports or not p.suite.endswith("-backports")]
        return sorted(found, key=cmp_to_key(lambda a, b: version_compare(b.version, a.version)))

    # ---- kernels ---------------------------------------------------------------------------
    def kernel_releases(self, *, backports: bool = True) -> list[str]:
        """Kernel releases with a headers package, newest first by the package's Debian version
        (never by the name's text: 6.12.115+deb13.1 is an ABI bump of 6.12.115, older than 6.12.117)."""
        releases = {}
        for name, pkgs in self.packages().items():
            release = name[len(_HEADERS_PREFIX):]
            if not name.startswith(_HEADERS_PREFIX) or not DEBIAN_RELEASE_RE.fullmatch(release):
                continue
            pkgs = [p for p in pkgs if backports or not p.suite.endswith("-backports")]
            if pkgs:
                releases[release] = max((p.version for p in pkgs), key=cmp_to_key(version_compare))
        return sorted(releases, key=cmp_to_key(lambda a, b: version_compare(releases[b], releases[a])
                                               or (a > b) - (a < b)))

    def latest_kernel(self, flavour: str = "amd64") -> str:
        """The newest release of a flavour across the suite, its -updates and its -security, of the
        distribution's own kernel line: the one its metapackage (linux-headers-amd64, -cloud-amd64,
        -rt-amd64) depends on in its newest version, as `apt upgrade` gives a host. Bookworm's security
        suite also carries a second line (linux-6.12, 6.12.x+deb12), which a bookworm host gets only
        when it asks for it by name; a suite without the metapackage: the newest release of all."""
        for meta in self.versions(f"{_HEADERS_PREFIX}{flavour}")[:1]:
            for alternatives in PkgRelation.parse_relations(meta.depends):
                release = alternatives[0]["name"].removeprefix(_HEADERS_PREFIX)
                m = DEBIAN_RELEASE_RE.fullmatch(release)
                if m and m.group("flavour") == flavour and self.versions(f"{_HEADERS_PREFIX}{release}"):
                    return release
        releases = [r for r in self.kernel_releases(backports=False)
                    if DEBIAN_RELEASE_RE.fullmatch(r).group("flavour") == flavour]
        if not releases:
            raise InputError(f"Debian {self.distribution} lists no kernel headers for {ARCH}",
                             hint="check --distribution (a Debian code name such as bookworm or trixie) and "
                                  "--apt-mirror")
        return releases[0]

    def kernel_packages(self, release: str) -> tuple[list[Package], int | None]:
        """The headers package of `release` with the packages it needs; and the gcc major it names."""
        headers = self.versions(f"linux-headers-{release}") or self.versions(f"linux-headers-{release}", backports=True)
        if not headers:
            available = self.kernel_releases()
            raise InputError(
                f"Debian {self.distribution} has no kernel headers for release {release!r}",
                hint="pass one of the releases it has: " + ", ".join(available[:12])
                + (f" (and {len(available) - 12} more)" if len(available) > 12 else ""),
            )
        top = headers[0]
        chosen = [top]
        gcc_major = None
        for alternatives in PkgRelation.parse_relations(top.depends):
            rel = alternatives[0]
            m = _COMPILER_RE.fullmatch(rel["name"])
            if m:
                gcc_major = int(m.group(1) or m.group(2))
                continue
            if not rel["name"].startswith(("linux-headers-", "linux-kbuild-")):
                continue
            candidates = [p for p in self.versions(rel["name"], backports=top.suite.endswith("-backports"))
                          if _satisfies(p.version, rel.get("version"))]
            if not candidates:
                raise InputError(f"{top.name} needs {rel['name']}, which Debian's index does not have",
                                 hint="refresh the index with --refresh, or check the mirror")
            chosen.append(candidates[0])
        return chosen, gcc_major

    def kernel_image(self, release: str) -> Package:
        """The kernel image package of a release (linux-image-RELEASE, signed as hosts run it;
        else its -unsigned build), for booting it in a guest."""
        for name in (f"linux-image-{release}", f"linux-image-{release}-unsigned"):
            found = self.versions(name, backports=True)
            if found:
                return found[0]
        raise InputError(f"Debian {self.distribution} has no kernel image for {release}",
                         hint="pass the target's kernel with --kernel-image FILE (its vmlinuz, or a linux-image .deb)")

    # ---- drivers ---------------------------------------------------------------------------
    def driver_sources(self, flavor: str) -> list[tuple[Package, DriverNames]]:
        """Every module source package of this flavour, newest first."""
        found = []
        for name in self.packages():
            m = _SOURCE_RE[flavor].fullmatch(name)
            if m:
                names = DriverNames(prefix=m.group(1) or "", source=name)
                found.extend((p, names) for p in self.versions(name, backports=self.driver_backports))
        return sorted(found, key=cmp_to_key(lambda a, b: version_compare(b[0].version, a[0].version)))

    def driver_packages(self, request: str | None, flavor: str, kernel_release: str
                        ) -> tuple[Package, list[Package], str]:
        """Resolve a driver version or branch to its module source and userspace packages."""
        sources = self.driver_sources(flavor)
        available = sorted({p.upstream_version for p, _ in sources}, key=version_tuple, reverse=True)
        if request is None:
            matching = [s for s in sources if kernel_supported(s[0].upstream_version, kernel_release)]
            if not matching and sources:
                raise InputError(f"no {flavor} driver in Debian {self.distribution} is known to support kernel "
                                 f"{kernel_release} (the newest kernel each was built and tested with is older: "
                                 + ", ".join(f"{v} to {_ceiling(v)}" for v in available) + ")",
                                 hint=NEWER_DRIVER_HINT)
            matching = matching or sources
            if not matching:
                raise InputError(f"Debian {self.distribution} has no {flavor} NVIDIA driver",
                                 hint="enable the contrib and non-free components of the mirror"
                                      + ("" if flavor == "open" else ", or use NVIDIA's installer: " + NEWER_DRIVER_HINT))
        else:
            matching = [s for s in sources
                        if s[0].upstream_version == request or s[0].upstream_version.startswith(request + ".")]
            if not matching:
                raise InputError(
                    f"Debian {self.distribution} has no {flavor} NVIDIA driver {request}",
                    hint="pass one of the versions it has: " + ", ".join(available) if available
                    else "enable the contrib and non-free components of the mirror",
                )
        source, names = matching[0]
        version = source.upstream_version
        if not kernel_supported(version, kernel_release):
            raise InputError(f"Debian's {source.name} {version} is not known to build for kernel {kernel_release}: "
                             f"the newest kernel it was built and tested with is {_ceiling(version)}",
                             hint=NEWER_DRIVER_HINT)
        userspace = []
        for name in names.required_userspace + names.optional_userspace:
            same = [p for p in self.versions(name, backports=self.driver_backports) if p.upstream_version == version]
            exact = [p for p in same if p.version == source.version]
            if exact or same:
                userspace.append((exact or same)[0])
            elif name in names.required_userspace:
                raise InputError(f"Debian {self.distribution} has {source.name} {version} but no {name} "
                                 f"of that version (the userspace must match the module exactly)",
                                 hint="pick another driver version with --driver; available: "
                                 + ", ".join(available))
        return source, userspace, version


def newer_in_backports(archive: "DebianArchive", source: Package) -> Package | None:
    """A newer packaging of a driver's module source in DIST-backports (Debian's fixes for newer
    kernels land there first), when the build did not ask for backports."""
    if archive.driver_backports:
        return None
    found = [p for p in archive.versions(source.name, backports=True)
             if p.suite.endswith("-backports") and version_compare(p.version, source.version) > 0]
    return found[0] if found else None


def _ceiling(driver: str) -> str:
    """The newest kernel line a driver is known to build for, as text (6.15)."""
    ceiling, _ = _known_ceiling(version_tuple(driver))
    return ".".join(map(str, ceiling or (0, 0)))


def _satisfies(version: str, constraint: tuple[str, str] | None) -> bool:
    if not constraint:
        return True
    op, wanted = constraint
    c = version_compare(version, wanted)
    return {"=": c == 0, ">=": c >= 0, "<=": c <= 0, ">>": c > 0, "<<": c < 0}[op]


def _parse_packages(text: bytes, base_url: str, suite: str = "") -> list[dict]:
    """The paragraphs of a Packages file that cudabuild can use, as Package fields."""
    keep = [para for para in text.split(b"\n\n") if _KEEP.match(para)]
    out = []
    for para in Packages.iter_paragraphs(b"\n\n".join(keep).decode("utf-8", "replace").splitlines(True),
                                         use_apt_pkg=False):
        if para.get("Architecture") not in (ARCH, "all"):
            continue
        out.append({"name": para["Package"], "version": para["Version"], "filename": para["Filename"],
                    "sha256": para["SHA256"], "size": int(para["Size"]), "base_url": base_url,
                    "depends": para.get("Depends", ""), "suite": suite})
    return out


def headers_files(deb: Path, release: str, into: Path) -> tuple[Path, Path]:
    """Module.symvers and .config of a Debian kernel, read on the host from its
    linux-headers-RELEASE package: what a pulled result is verified against."""
    from debian.debfile import DebFile

    wanted = {f"linux-headers-{release}/Module.symvers": into / "Module.symvers",
              f"linux-headers-{release}/.config": into / "config"}
    package = DebFile(str(deb))
    try:
        data = package.data.tgz()
        for member in data.getmembers():
            for suffix, target in wanted.items():
                if member.isfile() and member.name.endswith(suffix):
                    with data.extractfile(member) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
    finally:
        package.close()
    missing = [t.name for t in wanted.values() if not t.is_file()]
    if missing:
        raise VerifyError(f"{deb.name} has no {' or '.join(missing)} for {release}",
                          hint="the kernel's headers package is needed to verify pulled modules")
    return wanted[f"linux-headers-{release}/Module.symvers"], wanted[f"linux-headers-{release}/.config"]
