"""The modules artifact, the one contract between a build and everything that uses it: the
manifest (manifest.py), the image labels (labels.py), the checked directory (tree.py) and a modules
image's layer (layer.py). They are read and written here and nowhere else; `cudabuild.artifact`
names every public piece, so a reader imports the contract, not its rooms.

An artifact is a directory: `modules/*.ko`, `userspace/{lib,bin,firmware}/...` and `manifest.json`.
Whatever reads one (a fresh build's publish, a cache hit, `image`, `inspect`, and what comes after
them) goes through `load()`, which checks it as hard as a fresh build. A failure is an
ArtifactError (exit 3): the artifact is refused, never used."""

from cudabuild.artifact.labels import ImageLabels, node_image_labels, read_labels, read_node_labels
from cudabuild.artifact.layer import MAX_UNPACKED, extract_layer, unpack_image
from cudabuild.artifact.manifest import (BINARIES, FORMAT, LABEL_PREFIX, MANIFEST, MAX_BOOT_TESTS, MODULES_REPOSITORY,
                                         OPTIONAL_LIBRARIES, PARTS, REQUIRED_LIBRARIES, USERSPACE_TOPS, Manifest,
                                         ModuleEntry, UserspaceEntry, driver_file_ok, image_tag, library_name_ok,
                                         read_manifest)
from cudabuild.artifact.tree import (Artifact, check_signatures, describe_userspace, file_stats, find, load, walk)

__all__ = ["ImageLabels", "node_image_labels", "read_labels", "read_node_labels", "MAX_UNPACKED", "extract_layer",
           "unpack_image", "BINARIES", "FORMAT", "LABEL_PREFIX", "MANIFEST", "MAX_BOOT_TESTS", "MODULES_REPOSITORY",
           "OPTIONAL_LIBRARIES", "PARTS", "REQUIRED_LIBRARIES", "USERSPACE_TOPS", "Manifest", "ModuleEntry",
           "UserspaceEntry", "driver_file_ok", "image_tag", "library_name_ok", "read_manifest", "Artifact",
           "check_signatures", "describe_userspace", "file_stats", "find", "load", "walk"]
