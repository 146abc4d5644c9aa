"""The Python packages the module's features import, checked without importing them (standard library only: this
runs before torch is installed, on Slicer's Python 3.9 and later).

The check reads each package's metadata once and keeps the answer until :func:`forget` (after an install): the
widget asks on every change of its parameter node. Installing is the module's job (Slicer's pip helpers);
:func:`write_constraints` pins what must not move (the torch the PyTorch extension chose for the GPU driver, and
the numpy Slicer ships), and :func:`changed_imported` tells which already imported packages an install changed.
"""
import importlib.metadata
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Dependency:
    distribution: str  # the name pip and the package metadata use
    module: str  # the import name
    minimum: tuple  # (major, minor), () for any version
    purpose: str
    feature: str  # "run": Apply; "compare": Compare networks too; "optional": some networks only
    no_deps: bool = False  # installed without its dependencies

    @property
    def requirement(self):
        """The pip requirement, e.g. ``monai>=1.4``."""
        if not self.minimum:
            return self.distribution
        return "{}>={}".format(self.distribution, ".".join(str(number) for number in self.minimum))


DEPENDENCIES = (
    Dependency("torch", "torch", (2, 1), "every network", "run"),  # installed by the PyTorch extension
    Dependency("monai", "monai", (1, 4), "networks, attacks, corruptions and metrics", "run"),
    Dependency("nibabel", "nibabel", (), "Compare networks (its cases are NIfTI files)", "compare"),
    Dependency("matplotlib", "matplotlib", (), "Compare networks (its figures and report)", "compare"),
    Dependency("PyYAML", "yaml", (), "MONAI bundles and studies with .yaml configs", "optional"),
    # its timm and torchvision requirements are needed by none of nnU-Net's U-Nets and would replace torch
    Dependency("dynamic_network_architectures", "dynamic_network_architectures", (0, 4),
               "nnU-Net trained model folders", "optional", no_deps=True),
)
FEATURES = {"run": ("run",), "compare": ("run", "compare"), "all": ("run", "compare", "optional")}
PINNED = ("torch", "torchvision", "numpy")  # never moved by an install: the PyTorch extension's and Slicer's

_versions = {}  # distribution -> installed version (None: not installed), until forget()


def installed_version(distribution):
    """The installed version of ``distribution`` (None if it is not installed), read once until :func:`forget`."""
    if distribution not in _versions:
        try:
            _versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            _versions[distribution] = None
    return _versions[distribution]


def forget():
    """Read the package metadata again at the next check (call after installing)."""
    _versions.clear()
    importlib.invalidate_caches()


def version_tuple(version):
    """(major, minor) of a version text such as ``2.3.1+cu121`` or ``1.4rc1``."""
    numbers = []
    for part in version.split("+")[0].split(".")[:2]:
        digits = ""
        for character in part:
            if not character.isdigit():
                break
            digits += character
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)


def missing(feature="all"):
    """The dependencies of ``feature`` ("run", "compare" or "all") that are not installed or too old."""
    wanted = FEATURES[feature]
    return [dependency for dependency in DEPENDENCIES if dependency.feature in wanted
            and not _satisfied(dependency)]


def _satisfied(dependency):
    version = installed_version(dependency.distribution)
    return version is not None and version_tuple(version) >= dependency.minimum


def problems(feature="all"):
    """What is missing for ``feature``, one text per package (empty: all good)."""
    texts = []
    for dependency in missing(feature):
        version = installed_version(dependency.distribution)
        if version is None:
            texts.append("{} is not installed (needed for {})".format(dependency.distribution, dependency.purpose))
        else:
            texts.append("{} {} is older than {} (needed for {})".format(
                dependency.distribution, version, ".".join(str(n) for n in dependency.minimum), dependency.purpose))
    return texts


def constraints():
    """``name==version`` for each installed package of :data:`PINNED`: what pip must keep as it is."""
    lines = []
    for distribution in PINNED:
        version = installed_version(distribution)
        if version is not None:
            lines.append("{}=={}".format(distribution, version))
    return lines


def write_constraints(path):
    """Write :func:`constraints` as a pip constraints file (``pip install -c path``); returns ``path``."""
    with open(str(path), "w") as stream:
        stream.write("".join(line + "\n" for line in constraints()))
    return path


def installed_versions():
    """{distribution name: version} of every installed package (a full metadata scan: call it only around an
    install)."""
    importlib.invalidate_caches()
    versions = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            versions[name] = distribution.version
    return versions


def import_names(distribution):
    """The top-level modules a distribution provides (``top_level.txt``, else its files), for the restart check."""
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return set()
    text = found.read_text("top_level.txt")
    if text:
        return {line.strip() for line in text.splitlines() if line.strip()}
    names = set()
    for path in found.files or []:
        top = path.parts[0] if path.parts else ""
        if top.endswith(".py"):
            names.add(top[:-3])
        elif top and not top.endswith((".dist-info", ".egg-info", ".data")) and top != "..":
            names.add(top)
    return names or {distribution.replace("-", "_").lower()}


def changed_imported(before, after, modules=None):
    """[(distribution, old version or None, new version)] for the packages an install changed whose modules are
    already imported (``modules``: sys.modules): the old code stays loaded until Slicer restarts."""
    modules = sys.modules if modules is None else modules
    changed = []
    for name, version in sorted(after.items()):
        if before.get(name) != version and any(module in modules for module in import_names(name)):
            changed.append((name, before.get(name), version))
    return changed
