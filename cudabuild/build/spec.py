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

    def canonical(self) -> dict:
        return {"format": 2, "kernel_release": self.kernel_release, "driver_version": self.driver_version,
                "flavor": self.flavor, "kernel": self.kernel, "driver": self.driver, "builder": self.builder_tag,
                "modules": list(self.modules)}
