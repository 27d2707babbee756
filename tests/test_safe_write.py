"""safe_write.py: no command writes over a file it did not create unless --overwrite, never over its inputs, and a
failed or killed write leaves the target as it was (checked on the file system itself: bytes, inodes, listings)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gridinr_nerfstudio.safe_write import (
    OutputError,
    ProtectedFiles,
    atomic_output,
    check_target,
    staged_folder,
    staged_outputs,
    write_text,
)


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders the writers might have left (hidden `.NAME.*.partial*`)."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(".*partial*"))


def test_protected_files_are_found_through_links_and_other_spellings(tmp_path):
    source = tmp_path / "data" / "volume.raw"
    source.parent.mkdir()
    source.write_bytes(b"voxels")
    os.link(source, tmp_path / "hard.npy")
    (tmp_path / "soft.npy").symlink_to(source)
    protected = ProtectedFiles([(source, "the run's volume file")])
    for spelling in (source, tmp_path / "hard.npy", tmp_path / "soft.npy", tmp_path / "data" / ".." / "data" / "volume.raw"):
        assert protected.which(spelling) == "the run's volume file"
        with pytest.raises(OutputError, match="not even with --overwrite"):
            check_target(spelling, overwrite=True, protected=protected)
    assert protected.which(tmp_path / "other.npy") is None
    assert source.read_bytes() == b"voxels"


def test_existing_files_need_overwrite_and_are_replaced_whole(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("mine")
    with pytest.raises(OutputError, match=r"out.json exists \(use --overwrite to replace it\)"):
        write_text(target, "new")
    assert target.read_text() == "mine"
    inode = target.stat().st_ino
    write_text(target, "new", overwrite=True)
    assert target.read_text() == "new" and target.stat().st_ino != inode  # a new file renamed in, not rewritten
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
    assert leftovers(tmp_path) == []


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_output(target, overwrite=True) as temporary:
            temporary.write_bytes(b"half")
            raise OSError(28, "disk full")
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):  # folders it made for a new output go again
        with atomic_output(tmp_path / "new" / "deeper" / "out.bin") as temporary:
            raise RuntimeError
    assert not (tmp_path / "new").exists()


def test_several_outputs_are_all_checked_before_any_is_written(tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "dataset.json").write_text("theirs")
    with pytest.raises(OutputError, match="dataset.json exists"):
        with staged_outputs([tmp_path / "set" / "v" / "a.raw", tmp_path / "set" / "dataset.json"]):
            pytest.fail("nothing may be written")
    assert sorted(p.name for p in (tmp_path / "set").rglob("*")) == ["dataset.json"]


def test_a_file_that_appears_meanwhile_is_not_clobbered(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(OutputError, match="exists"):
        with atomic_output(target) as temporary:
            temporary.write_text("ours")
            target.write_text("someone else's")
    assert target.read_text() == "someone else's" and leftovers(tmp_path) == []


def test_kill_during_a_write_leaves_nothing(tmp_path):
    """SIGTERM (`kill PID`) in the middle of a write: exit status 143, the old file intact, no temporary file."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from gridinr_nerfstudio.safe_write import atomic_output
        with atomic_output(Path({str(target)!r}), overwrite=True) as temporary:
            temporary.write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            import time; time.sleep(30)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "Traceback" not in result.stderr
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_frame_folders_are_replaced_frame_for_frame(tmp_path):
    frames = tmp_path / "frames"
    with staged_folder(frames, "frame_*.png") as staging:
        for index in range(3):
            (staging / f"frame_{index:05d}.png").write_text(str(index))
    assert sorted(p.name for p in frames.iterdir()) == [f"frame_{i:05d}.png" for i in range(3)]
    (frames / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds 3 frame_\\*.png file"):
        with staged_folder(frames, "frame_*.png"):
            pytest.fail("refused before")
    with staged_folder(frames, "frame_*.png", overwrite=True) as staging:
        (staging / "frame_00000.png").write_text("new")
    # The older, longer render's frames are gone; files that are not frames are never touched.
    assert sorted(p.name for p in frames.iterdir()) == ["frame_00000.png", "notes.txt"]
    assert (frames / "frame_00000.png").read_text() == "new" and (frames / "notes.txt").read_text() == "mine"
    assert leftovers(tmp_path) == []


def test_bench_json_and_demo_output_refuse_what_they_did_not_write(tmp_path):
    from gridinr_nerfstudio.scripts.bench.cli import main as bench_main
    from gridinr_nerfstudio.scripts.demo import main as demo_main

    results = tmp_path / "numbers.json"
    results.write_text("earlier figures")
    with pytest.raises(SystemExit, match=r"numbers.json exists \(use --overwrite"):
        bench_main(["encoding", "--json", str(results)])  # refused before it measures anything
    assert results.read_text() == "earlier figures"
    mine = tmp_path / "my-folder"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(SystemExit, match="is not a previous demo's output"):
        demo_main(["--output-dir", str(mine)])
    assert (mine / "thesis.tex").read_text() == "years of work"
