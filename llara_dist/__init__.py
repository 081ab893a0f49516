"""llara-dist: distributed LLaRA post-training of decoder LLMs into dense retrievers."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _installed_version

try:  # the installed distribution's number, the one pip reports
    __version__ = _installed_version("llara-dist")
except PackageNotFoundError:  # a checkout run without installing it: pyproject.toml's [project] version
    __version__ = "0.1.0"
