"""``hiresdiff comfyui-install``: the node pack for a ComfyUI whose environment has hiresdiff installed by pip.

ComfyUI loads custom nodes only from folders in its ``custom_nodes``; a clone of this repository is such a folder
(its ``__init__.py`` puts the checkout's ``src`` on the path). After ``pip install hiresdiff`` into ComfyUI's Python,
this command writes the folder instead: ``custom_nodes/hiresdiff/__init__.py``, which takes the nodes from the
installed package — so upgrading hiresdiff with pip upgrades the nodes. A folder of that name that this command did
not write (a clone) is left alone, in one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hiresdiff.errors import HiresError

FOLDER = "hiresdiff"
#: the first line of the ``__init__.py`` this command writes (how a later run knows the folder is its own)
MARK = "# written by `hiresdiff comfyui-install`: ComfyUI's nodes of the hiresdiff package installed by pip"
INIT = f'''{MARK}
"""hiresdiff's ComfyUI nodes (:mod:`hiresdiff.comfy.nodes`) from the hiresdiff installed in ComfyUI's Python."""

from hiresdiff.comfy.nodes import node_mappings

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = node_mappings()
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def register(sub: argparse._SubParsersAction) -> dict[str, Any]:
    p = sub.add_parser(
        "comfyui-install",
        help="add the ComfyUI nodes of this pip-installed hiresdiff to a ComfyUI (run with ComfyUI's Python)",
    )
    p.add_argument("comfyui", help="the ComfyUI folder (the one with custom_nodes/), or its custom_nodes folder")
    return {"comfyui-install": cmd_comfyui_install}


def custom_nodes_of(path: Path) -> Path:
    """``path``'s ``custom_nodes`` folder (``path`` may be it), or one line saying what is missing."""
    if path.name == "custom_nodes" and path.is_dir():
        return path
    nodes = path / "custom_nodes"
    if not nodes.is_dir():
        raise HiresError(f"{path} has no custom_nodes folder: give the ComfyUI folder (the one with main.py)")
    return nodes


def install(comfyui: Path) -> Path:
    """Write ``custom_nodes/hiresdiff/__init__.py`` (atomically) and return the folder; refused in one line when
    a folder of that name is not this command's (a clone of the repository is a node pack already)."""
    folder = custom_nodes_of(comfyui) / FOLDER
    init = folder / "__init__.py"
    if folder.exists():
        first = init.read_text(errors="replace").split("\n", 1)[0] if init.is_file() else ""
        if first != MARK:
            raise HiresError(
                f"{folder} exists and was not written by this command (a clone of hiresdiff is a node pack already): "
                "nothing changed"
            )
    folder.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".__init__.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(INIT)
        os.replace(tmp, init)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder


def cmd_comfyui_install(args: argparse.Namespace) -> int:
    folder = install(Path(args.comfyui).expanduser())
    print(
        f"hiresdiff nodes installed in {folder}; restart ComfyUI. ComfyUI's Python must have hiresdiff installed "
        f"(this one is {sys.executable})."
    )
    return 0
