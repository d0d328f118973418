"""``hiresdiff comfyui-install``: the node pack folder for a ComfyUI whose Python has hiresdiff installed by pip."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from hiresdiff.cli import main
from hiresdiff.comfy.cli import MARK


def load(init: Path) -> object:
    """Import ``init`` as ComfyUI imports a custom node folder (a module of its own name)."""
    spec = importlib.util.spec_from_file_location("custom_nodes.hiresdiff", init)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_writes_a_node_pack_of_the_installed_package(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "custom_nodes").mkdir(parents=True)
    assert main(["comfyui-install", str(comfyui)]) == 0
    init = comfyui / "custom_nodes" / "hiresdiff" / "__init__.py"
    assert init.read_text().startswith(MARK + "\n") and sys.executable in capsys.readouterr().out
    had_comfy = "comfy" in sys.modules
    nodes = load(init)
    assert "HiresdiffSample" in nodes.NODE_CLASS_MAPPINGS  # type: ignore[attr-defined]
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(nodes.NODE_CLASS_MAPPINGS)  # type: ignore[attr-defined]
    assert ("comfy" in sys.modules) == had_comfy  # the pack imports ComfyUI only when a node runs
    # again, and given the custom_nodes folder itself: the same file, nothing else in the folder
    assert main(["comfyui-install", str(comfyui / "custom_nodes")]) == 0
    assert [p.name for p in init.parent.iterdir()] == ["__init__.py"]


def test_a_folder_it_did_not_write_or_no_comfyui_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clone = tmp_path / "ComfyUI" / "custom_nodes" / "hiresdiff"
    clone.mkdir(parents=True)
    (clone / "__init__.py").write_text('"""a clone of the repository"""\n')
    assert main(["comfyui-install", str(tmp_path / "ComfyUI")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was not written by this command" in err
    assert (clone / "__init__.py").read_text() == '"""a clone of the repository"""\n'  # untouched
    assert main(["comfyui-install", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no custom_nodes folder" in err
