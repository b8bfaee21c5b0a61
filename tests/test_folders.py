"""The one folder-replacement routine: refuses what is not an adapter folder, never
leaves the destination empty or half-written, survives interruption at every step
(an exception in-process, and the process killed there), with the atomic exchange and
with the two-rename fallback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import make_model

import polyadapter as pa
from polyadapter.formats import convert, folders
from polyadapter.formats.folders import DestinationError, recover, replace_folder

STEPS = ["written", "parked", "swapped", "cleaned"]


def adapter_folder(path: Path, version: str) -> Path:
    path.mkdir(parents=True)
    (path / "polyadapter.json").write_text(json.dumps({"version": version}))
    (path / "adapter.safetensors").write_bytes(version.encode() * 1000)
    return path


def fill_with(version: str):
    def fill(tmp: Path) -> None:
        (tmp / "polyadapter.json").write_text(json.dumps({"version": version}))
        (tmp / "adapter.safetensors").write_bytes(version.encode() * 1000)
    return fill


def version_at(path: Path) -> str:
    """The complete version at ``path``: both files present and from the same write."""
    meta = json.loads((path / "polyadapter.json").read_text())["version"]
    assert (path / "adapter.safetensors").read_bytes() == meta.encode() * 1000, "half-written folder"
    assert sorted(p.name for p in path.iterdir()) == ["adapter.safetensors", "polyadapter.json"]
    return meta


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(params=["exchange", "two-renames"])
def mode(request, monkeypatch):
    if request.param == "two-renames":
        monkeypatch.setattr(folders, "_renameat2", None)
    return request.param


class Interrupt(BaseException):
    """Stands for Ctrl-C or any exception at that point."""


@pytest.mark.parametrize("step", STEPS)
def test_interrupted_by_an_exception_at_each_step(tmp_path, mode, monkeypatch, step):
    dst = adapter_folder(tmp_path / "dst", "old")

    def hook(name):
        if name == step:
            raise Interrupt(name)

    monkeypatch.setattr(folders, "_after_step", hook)
    if mode == "exchange" and step == "parked":  # the exchange has no parked step: nothing to interrupt
        replace_folder(dst, fill_with("new"), overwrite=True)
        assert version_at(dst) == "new"
        return
    with pytest.raises(Interrupt):
        replace_folder(dst, fill_with("new"), overwrite=True)
    expected = "old" if step in ("written", "parked") else "new"
    assert version_at(dst) == expected
    recover(dst)
    assert version_at(dst) == expected and leftovers(tmp_path) == []


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from polyadapter.formats import convert, folders
    step, mode, dst = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    if mode == "two-renames":
        folders._renameat2 = None
    def hook(name):
        if name == step:
            os._exit(77)  # killed right here: no cleanup, no except blocks
    folders._after_step = hook
    def fill(tmp):
        (tmp / "polyadapter.json").write_text('{"version": "new"}')
        (tmp / "adapter.safetensors").write_bytes(b"new" * 1000)
    folders.replace_folder(dst, fill, overwrite=True)
""")


@pytest.mark.parametrize("mode_name", ["exchange", "two-renames"])
def test_killed_at_each_step_then_recovered(tmp_path, mode_name):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT)
    for step in STEPS:
        root = tmp_path / f"{mode_name}-{step}"
        dst = adapter_folder(root / "dst", "old")
        proc = subprocess.run([sys.executable, str(script), step, mode_name, str(dst)], timeout=120,
                              capture_output=True, text=True)
        crashed = proc.returncode == 77
        assert proc.returncode in (0, 77), proc.stderr
        assert crashed or (mode_name == "exchange" and step == "parked")
        # A reader (detect_format) and any writer run recover() first: the folder is whole.
        recover(dst)
        assert version_at(dst) == ("old" if step in ("written", "parked") and crashed else "new"), step
        assert leftovers(root) == [], (step, leftovers(root))


def test_refuses_to_replace_what_is_not_an_adapter_folder(tmp_path, mode):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "me.jpg").write_bytes(b"\xff\xd8")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(adapter_folder(tmp_path / "real", "old"))
    for dst in (precious, a_file, link):
        with pytest.raises(DestinationError, match="refusing to replace it"):
            replace_folder(dst, fill_with("new"), overwrite=True)
    assert (precious / "me.jpg").read_bytes() == b"\xff\xd8" and a_file.read_text() == "keep me"
    assert version_at(tmp_path / "real") == "old"
    with pytest.raises(FileExistsError, match="already exists"):
        replace_folder(adapter_folder(tmp_path / "kept", "old"), fill_with("new"))
    assert version_at(tmp_path / "kept") == "old"
    empty = tmp_path / "empty"
    empty.mkdir()
    replace_folder(empty, fill_with("new"), overwrite=True)  # an empty folder may be filled
    assert version_at(empty) == "new"


def test_unwritable_destinations_are_clear_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DestinationError, match="is not a folder"):
        replace_folder(a_file / "sub" / "dst", fill_with("new"))
    with pytest.raises(OSError):
        replace_folder(Path("/proc/polyadapter-cannot-write-here/dst"), fill_with("new"))


def test_failing_fill_leaves_the_old_folder_and_no_leftovers(tmp_path, mode):
    dst = adapter_folder(tmp_path / "dst", "old")

    def fill(tmp):
        (tmp / "polyadapter.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        replace_folder(dst, fill, overwrite=True)
    assert version_at(dst) == "old" and leftovers(tmp_path) == []


# ---------------------------------------------------------------------- every writer uses it
@pytest.fixture
def pm():
    model = pa.AdapterModel(make_model("bert"))
    model.add_adapter("a", pa.LoraConfig(r=2, targets=["query"]))
    return model


def test_save_and_convert_refuse_to_overwrite_other_folders(pm, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for fmt in ("native", "peft"):
        with pytest.raises(DestinationError, match="not an adapter folder"):
            pm.save_adapter("a", precious, format=fmt, overwrite=True)
    src = pm.save_adapter("a", tmp_path / "src")
    with pytest.raises(DestinationError, match="not an adapter folder"):
        convert(src, precious, "peft", overwrite=True)
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]


def test_save_over_an_adapter_interrupted_keeps_the_old_adapter_loadable(pm, tmp_path, monkeypatch):
    dst = pm.save_adapter("a", tmp_path / "a")
    old = (dst / "adapter.safetensors").read_bytes()
    with torch.no_grad():
        for p in pm.adapter_parameters("a").values():
            p.add_(1.0)
    for step in ("written", "parked"):
        monkeypatch.setattr(folders, "_renameat2", None)

        def hook(name, step=step):
            if name == step:
                raise KeyboardInterrupt

        monkeypatch.setattr(folders, "_after_step", hook)
        with pytest.raises(KeyboardInterrupt):
            pm.save_adapter("a", dst, overwrite=True)
        assert (dst / "adapter.safetensors").read_bytes() == old
    monkeypatch.setattr(folders, "_after_step", None)
    fresh = pa.AdapterModel(make_model("bert"))
    fresh.load_adapter(dst, name="back")
    assert "back" in fresh.adapters
    assert os.listdir(tmp_path) == ["a"]
