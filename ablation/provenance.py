"""The library versions behind a run's numbers: recorded in env.json, pinned per sweep in its constraints file. Torch-free."""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

# The distributions a run's numbers or its outputs depend on: the model, the pixels, the tables and figures.
PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "pandas", "matplotlib", "submitit", "pyyaml", "tqdm")


def package_versions() -> dict[str, str | None]:
    """Installed version of each of PACKAGES (None where one is missing), as pip names them."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def constraints_text(versions: dict[str, str | None], header: str) -> str:
    """A pip constraints file pinning `versions` (local tags such as +cu130 kept: they name the build)."""
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{name}=={version}" for name, version in versions.items() if version]
    return "\n".join(lines) + "\n"


def parse_constraints(text: str) -> dict[str, str]:
    """The name==version pins of a constraints file (comments and other lines skipped)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = (part.strip() for part in line.split("==", 1))
            pins[name.lower()] = version
    return pins


def recorded_versions(env: dict) -> dict[str, str]:
    """The versions an env.json records in its `packages` map ({} for folders from before it).

    Older folders only have the modules' own __version__ (torch's "2.14.1+cu130" where pip's metadata may say
    "2.14.1"): not the same kind of string as a pin, so they are not compared rather than always reported.
    """
    packages = env.get("packages")
    return {k: v for k, v in packages.items() if isinstance(v, str)} if isinstance(packages, dict) else {}


def differences(recorded: dict[str, str], pinned: dict[str, str]) -> dict[str, tuple[str, str]]:
    """name -> (recorded, pinned) for each package both name with different versions."""
    return {name: (recorded[name], pinned[name]) for name in sorted(recorded.keys() & pinned.keys()) if recorded[name] != pinned[name]}


def cpu_model() -> str:
    """The CPU's model name (float kernels, and so the last digits of a CPU run, depend on its instruction set)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_version() -> str:
    """A hash of the package's source files: the code behind a number (git-independent: an installed copy has one too)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
