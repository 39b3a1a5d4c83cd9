"""Which optional extra of ``neco-loss`` installs each optional module.

The core (``NeCoLoss``, the sorters, ``neco --help``) needs only torch and torchvision (which
brings numpy and pillow); everything else comes with an extra of ``pyproject.toml``. A command
that meets a missing module names the extra to install in one line (``install_hint``);
``tests/test_extras.py`` checks this table against ``pyproject.toml`` and against every import
in ``neco_loss`` (the lightly and solo-learn adapters name their own requirements).

>>> install_hint("timm")
'pip install "neco-loss[train]"'
>>> install_hint("os") is None
True
"""

from __future__ import annotations

EXTRA_OF_MODULE: dict[str, str] = {
    # neco train / demo / ablate / testbed-backbone / make-images / eval, and the recipes
    "yaml": "train",
    "timm": "train",
    "huggingface_hub": "train",  # timm's own dependency: is a pretrained file cached?
    "tqdm": "train",
    "matplotlib": "train",
    "lightly": "train",
    "scipy": "train",
    # neco eval overclustering: k-means and Hungarian matching
    "faiss": "eval",
    # optional in-context neighbour search
    "scann": "scann",
    # transformers backbones (model: hf:... or a save_pretrained folder)
    "transformers": "hf",
    # sorting backends
    "diffsort": "diffsort",
    "torchsort": "torchsort",
    # neco check-sorter and neco_loss.testing (with its pytest fixture)
    "hypothesis": "testing",
    "pytest": "testing",
}


def install_hint(module: str) -> str | None:
    """``pip install "neco-loss[EXTRA]"`` for an optional module (top-level name), else ``None``."""
    extra = EXTRA_OF_MODULE.get(module.split(".")[0])
    return None if extra is None else f'pip install "neco-loss[{extra}]"'
