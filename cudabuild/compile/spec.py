"""The value a build is: everything that decides the built modules. The cache key is a hash of it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class BuildSpec:
    """Everything that decides the built modules: the cache key is a hash of `canonical()`."""

    kernel_release: str
    driver_version: str
    flavor: str
    kernel: dict  # the kernel source's own description: packages, or repository/tag/config/symvers
    driver: dict  # the driver source's: packages, or the installer's sha256
    builder_tag: str
    modules: tuple[str, ...] = field(default_factory=tuple)
    signing: dict | None = None  # {"cert_sha256": ...}: signed with that certificate's key

    def canonical(self) -> dict:
        """What the key hashes. A signed build's adds the certificate's digest: another key is
        another build, and signed and unsigned results never share a key."""
        return {"format": 2, "kernel_release": self.kernel_release, "driver_version": self.driver_version,
                "flavor": self.flavor, "kernel": self.kernel, "driver": self.driver, "builder": self.builder_tag,
                "modules": list(self.modules), **({"signing": self.signing} if self.signing else {})}
