"""`cudabuild image` as one library call: a profile's runtime image or driver image baked over the
modules it names (found, or built first with the build options), the kernel-agnostic driver image,
or cudabuild's own tool image; pushed to the registry when one is named."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from cudabuild.bake import image as images
from cudabuild.compile.intake import find_modules
from cudabuild.compile.modules import build_modules
from cudabuild.node.config import NodeConfig
from cudabuild.options import BuildOptions, validate_image_ref
from cudabuild.settings import Services
from cudabuild.ui import Report


@dataclass(frozen=True)
class BakeRequest:
    profile: str | None
    base: str | None = None
    modules_ref: str | None = None
    tag: str | None = None
    dry_run: bool = False
    push: bool = True
    registry: str | None = None  # --registry (else CUDABUILD_REGISTRY)
    driver: str | None = None  # the kernel-agnostic driver image's driver
    build: BuildOptions | None = None  # --kernel/--driver given: build (or find) the modules first
    rebuild: bool = False  # --no-cache
    sign_image: str | None = None  # --sign-image: the pushed image is signed and attested
    verify_key: str | None = None  # --verify-key: --modules IMAGE is used only when signed by it


def list_profiles() -> Report:
    found = images.profiles()
    return Report({name: {"base": p.base, "description": p.description} for name, p in found.items()},
                  [f"{name:<14} {p.base:<48} {p.description}" for name, p in found.items()])


def bake(request: BakeRequest, services: Services) -> Report:
    """The request's image (its flags were checked together by the command line: a profile or a
    base; --modules or a build, not both; the tool image with --registry and --no-cache only)."""
    if request.profile == "tool":
        return _tool_image(request, services)
    chosen = images.load_profile(request.profile, request.base)
    if request.tag is not None:
        validate_image_ref(request.tag, "--tag")
    repo = services.settings.registry_repo(request.registry)
    if chosen.kind == "driver" and request.modules_ref is None and (request.build is None or request.build.kernel is None) \
            and repo:
        return _node_driver_image(chosen, repo, request, services)
    registry = services.registry(request.build.registry if request.build else repo)
    if request.dry_run:
        return Report({"dockerfile": images.render_runtime(chosen)}, [images.render_runtime(chosen)])
    reporter = services.reporter
    if request.build is not None:
        checked = build_modules(request.build, services).artifact
    else:
        checked = find_modules(request.modules_ref, services, verify_key=request.verify_key)
    reporter.note(f"modules: {checked.root}")
    engine = services.engine()
    report = images.build_image(profile=chosen, checked=checked, engine=engine, cache=services.cache,
                                tag=request.tag, reporter=reporter)
    if registry and request.push:
        report["registry_ref"] = registry.ref(report["image"])
        _push(services, report["image"], report["registry_ref"])
        report["signed"] = _sign(services, registry, report["registry_ref"], checked, request)
    lines = [f"{report['image']}: {report['profile']} on {report['base']}, one layer added",
             f"  NVIDIA {report['driver_version']} for Linux {report['kernel_release']}"
             + (f"; base CUDA {report['base_cuda']} (driver supports up to {report['max_cuda']})"
                if report["base_cuda"] else "")]
    if chosen.kind == "driver":
        lines += [f"  run it once per host: docker run --rm --privileged --pid host -v /:/host {report['image']} "
                  "[--wait]",
                  "  then any container: podman run --device nvidia.com/gpu=0 IMAGE, or cudabuild run --gpus 0 IMAGE"]
    else:
        lines.append(f"  run it: docker run --privileged {report['image']} {shlex.join(report['smoke'])}")
    return Report(report, lines)


def _push(services: Services, image: str, ref: str) -> None:
    with services.reporter.step(f"push {ref}"):
        services.engine().push(image, ref)


def _sign(services: Services, registry, ref: str, checked, request: BakeRequest) -> list[str]:
    """With --sign-image: the pushed image's signature, and the provenance and SBOM of the driver
    it carries, beside it in the registry."""
    if not request.sign_image:
        return []
    from cudabuild.compile.publish import sign_pushed
    from cudabuild.registry.trust import PASSPHRASE_ENV

    found = registry.resolve(ref)
    options = request.build or services.settings.build_options({"sign_image": request.sign_image})
    return sign_pushed(registry, ref, found.digest, checked, options=options, reporter=services.reporter,
                       passphrase=services.settings.environ.get(PASSPHRASE_ENV))


def _node_driver_image(chosen, repo: str, request: BakeRequest, services: Services) -> Report:
    """The kernel-agnostic driver container (no --modules, no --kernel), pushed to REPO/driver:TAG."""
    registry = services.registry(repo)
    config = NodeConfig(driver=request.driver, registry=registry.repo)
    if request.dry_run:
        text = images.render_runtime(chosen, {"registry": registry.repo, "command": images.node_command(config)})
        return Report({"dockerfile": text}, [text])
    report = images.build_node_driver_image(profile=chosen, registry=registry.repo, driver=config.driver,
                                            engine=services.engine(), cache=services.cache, tag=request.tag,
                                            reporter=services.reporter)
    report["registry_ref"] = registry.ref(report["image"]) if request.push else None
    if request.push:
        _push(services, report["image"], report["registry_ref"])
    lines = [f"{report['image']}: the driver container for every kernel (driver {config.shown_driver}, builds "
             f"from {registry.repo})" + (f", pushed as {report['registry_ref']}" if request.push else ""),
             f"  run it once per host: docker run --rm --privileged --pid host --network host -v /:/host "
             f"{report['registry_ref'] or report['image']}",
             f"  one DaemonSet for a fleet of mixed kernels: cudabuild deploy kubernetes --registry {registry.repo}"]
    return Report(report, lines)


def _tool_image(request: BakeRequest, services: Services) -> Report:
    """cudabuild's own image, from the installed cudabuild."""
    from cudabuild.fleet.toolimage import make_tool_image

    registry = services.registry(services.settings.registry_repo(request.registry))
    report = make_tool_image(services.engine(), registry=registry, reporter=services.reporter, rebuild=request.rebuild)
    return Report(report, [report["image"] + (" (made earlier from the same wheel)" if report["reused"] else "")
                           + (f" (pushed as {report['registry_ref']})" if report["registry_ref"] else "")])
