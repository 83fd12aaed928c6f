"""What a node's driver is (node.json under the host's /var/lib/cudabuild): the driver version or
branch, its flavour, the registry the builds come from, whether another version may stand in, and
the exact driver it last installed. The driver image bakes it into its command; `install`, `stage`
and `ready` read it."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from cudabuild.artifact import Artifact
from cudabuild.errors import InputError, shown
from cudabuild.host.root import HostPathError, HostRoot
from cudabuild.nvidia import FLAVORS, FULL_DRIVER_RE
from cudabuild.options import validate_driver

NODE_CONFIG = "var/lib/cudabuild/node.json"
CONFIG_LIMIT = 64 << 10  # node.json is a few hundred bytes


@dataclass(frozen=True)
class NodeConfig:
    """What a node's driver is: a driver version or branch ("535", "535.309.01"; None: the newest
    there is), its flavour (open or proprietary; None: either), the registry it comes from, whether
    another version may stand in, and the exact driver it last installed (what a node configured
    for "any" driver keeps across a reboot: `ready` answers for that one)."""

    driver: str | None = None
    registry: str | None = None
    fallback: bool = True
    flavor: str | None = None
    installed: str | None = None  # the exact driver version the node installed last
    verify_key: str | None = None  # the node's policy: the PEM public key its builds must be signed by

    def __post_init__(self) -> None:
        if self.driver is not None:
            validate_driver(self.driver)
        if self.flavor is not None and self.flavor not in FLAVORS:
            raise InputError(f"flavor {shown(self.flavor)} is not one of {', '.join(FLAVORS)}",
                             hint="pass --flavor open or --flavor proprietary")

    @property
    def shown_driver(self) -> str:
        """The driver as a flag takes it (a version, a branch, or any)."""
        return self.driver or "any"

    @property
    def described(self) -> str:
        """The driver and flavour, as a message says them."""
        return self.shown_driver + (f" ({self.flavor})" if self.flavor else "")

    def wants(self, version: str, flavor: str | None = None) -> bool:
        """Whether a build of driver `version` (and `flavor`, when given) is this node's."""
        if self.flavor is not None and flavor is not None and flavor != self.flavor:
            return False
        return self.driver is None or version == self.driver or version.startswith(self.driver + ".")

    def wants_build(self, checked: Artifact) -> bool:
        return self.wants(checked.manifest.driver_version, checked.manifest.flavor)

    def kept(self) -> "NodeConfig":
        """This configuration as a node answers for it: configured for any driver, it keeps the exact
        one it installed (a reboot does not change the driver unasked)."""
        return self if self.driver or not self.installed else replace(self, driver=self.installed)

    def args(self) -> list[str]:
        """The flags that name this driver and registry to `install` and `stage`: --registry R [--driver D]."""
        return [*(["--registry", self.registry] if self.registry else []),
                *(["--driver", self.driver] if self.driver else []),
                *(["--flavor", self.flavor] if self.flavor else [])]

    def to_json(self) -> dict:
        return {"driver": self.driver, "flavor": self.flavor, "registry": self.registry, "fallback": self.fallback,
                "installed": self.installed, **({"verify_key": self.verify_key} if self.verify_key else {})}

    def save(self, host: HostRoot) -> None:
        host.owned_path(str(PurePosixPath(NODE_CONFIG).parent), create=True)
        host.write_atomic(NODE_CONFIG, (json.dumps(self.to_json(), indent=2) + "\n").encode())

    @classmethod
    def load(cls, host: HostRoot) -> "NodeConfig | None":
        """The node's configuration; None when it has none. A file that is there but malformed is
        an InputError naming it (never taken as "any driver")."""
        where = host.show(NODE_CONFIG)
        fix = "remove it and configure the node again: cudabuild install --registry REPO --driver BRANCH"
        try:
            text = host.read_text(NODE_CONFIG, limit=CONFIG_LIMIT)
        except HostPathError as exc:
            if not host.exists(NODE_CONFIG):
                return None
            raise InputError(exc.message, hint=fix) from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise InputError(f"{where} is not the node's configuration (not JSON: {shown(str(exc)[:80])})",
                             hint=fix) from None
        if not isinstance(data, dict):
            raise InputError(f"{where} is a JSON {type(data).__name__}, not the node's configuration (an object)",
                             hint=fix)

        def field_(name: str, kind, check=None):
            value = data.get(name)
            if value is None:
                return None
            if not isinstance(value, kind) or (check is not None and not check(value)):
                raise InputError(f"{where}: {name} {shown(str(value)[:80])} is not valid", hint=fix)
            return value

        driver = field_("driver", str)  # checked as --driver is, by __post_init__
        registry = field_("registry", str, lambda v: len(v) < 512)
        flavor = field_("flavor", str)  # checked by __post_init__
        installed = field_("installed", str, FULL_DRIVER_RE.fullmatch)
        fallback = field_("fallback", bool)
        verify_key = field_("verify_key", str, lambda v: len(v) < 4096 and "PUBLIC KEY" in v)
        try:
            return cls(driver=driver, registry=registry, fallback=fallback is not False, flavor=flavor,
                       installed=installed, verify_key=verify_key)
        except InputError as exc:
            raise InputError(f"{where}: {exc.message}", hint=fix) from None
