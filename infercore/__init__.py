"""infercore: an inference server for dense embeddings, learned sparse embeddings and reranking.

The subpackages ``infercore.server``, ``infercore.models`` and ``infercore.kernels`` live in the
repository's top-level folders ``server/``, ``models/`` and ``kernels/``. Those folders carry no
``__init__.py`` on purpose: with the repository root on ``sys.path`` (``python -m pytest``,
``python -c`` from the root, a script run from a checkout) a regular package named ``kernels`` or
``models`` would shadow an installed distribution of that name (Hugging Face's ``kernels``, which
transformers imports). As folders without ``__init__.py`` they are at most namespace portions, which
any installed package of the same name outranks.

An installed wheel copies the folders into ``infercore/`` (setuptools' package-dir mapping), where the
normal path search finds them. From a checkout (editable install or none), ``_CheckoutFolders`` below
maps each subpackage to its folder.
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

__version__ = "0.1.0"

SUBPACKAGE_FOLDERS = ("server", "models", "kernels")


class _CheckoutFolders:
    """Meta-path finder: ``infercore.<name>`` → the checkout's top-level ``<name>/`` folder, as a
    package whose modules import normally from that folder."""

    def __init__(self, root: Path) -> None:
        self.folders = {f"{__name__}.{name}": root / name for name in SUBPACKAGE_FOLDERS}

    def find_spec(self, fullname: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        return spec


def _install_checkout_finder() -> None:
    package_dir = Path(__file__).resolve().parent
    if all((package_dir / name).is_dir() for name in SUBPACKAGE_FOLDERS):
        return  # an installed wheel: the subpackages sit inside the package
    root = package_dir.parent
    if not all((root / name).is_dir() for name in SUBPACKAGE_FOLDERS):
        return
    if not any(isinstance(finder, _CheckoutFolders) for finder in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutFolders(root))


_install_checkout_finder()
