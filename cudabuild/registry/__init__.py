"""Where the fleet's images are kept: a registry over HTTP (client.py) or an OCI image layout on
disk, the air-gapped bundle (layout.py), read and written the same way (store.py); and the
signatures and attestations that say who made an image from what (trust.py)."""

from cudabuild.registry.client import Registry
from cudabuild.registry.layout import OciLayout, is_layout
from cudabuild.registry.store import ImageStore, LayerStore, Resolved

__all__ = ["Registry", "OciLayout", "is_layout", "ImageStore", "LayerStore", "Resolved", "open_store"]


def open_store(repo: str, *, docker_config=None) -> ImageStore:
    """The store `repo` names: oci:DIR (a bundle), else HOST[:PORT]/PATH (a registry)."""
    return OciLayout(repo) if is_layout(repo) else Registry(repo, docker_config=docker_config)
