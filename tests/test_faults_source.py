"""Issue 20, rows 3, 6 and 7: an ImageFolder with a folder symlink that loops back, class folders whose
names differ only in Unicode normalisation between splits, and files kdlib does not read (.webp, .txt, ...).

Real folders, real symlinks, real `python -m kdlib train` runs: a loop is followed once and noted (no
traceback), an NFD test folder is the NFC training class (and a class really missing shows its code
points), unread files are counted in one `note:` line on stderr; the fingerprint of a folder listed before
these changes is what it was (stores written before still match their source).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
from conftest import REPO

from kdlib.errors import SourceError
from kdlib.source import open_source

# Three tiny PNGs as bytes (3x2, 2x3, 4x4 RGB): a golden fingerprint needs files that no encoder
# version can change.
PNGS = [
    base64.b64decode(s)
    for s in (
        "iVBORw0KGgoAAAANSUhEUgAAAAMAAAACCAIAAAASFvFNAAAAHUlEQVR4nGP4cWjf+clSb0W/Mlx+r8s6d76N2RsAcxgKetKeABoAAAAASUVORK5CYII=",
        "iVBORw0KGgoAAAANSUhEUgAAAAIAAAADCAIAAAA2iEnWAAAAHUlEQVR4nGM8HqTAduk5Y9s9Sx6tGAY+fjGuCRcATqkGxwN242AAAAAASUVORK5CYII=",
        "iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAP0lEQVR4nAE0AMv/AAcpC1U7aOFu4skInwQT8pgl+IboCN7d3OIAMrMAsYk/"
        "Dbz/QF4IBNbpGWwUU7G33MnJXFI7GC+g2ZyaAAAAAElFTkSuQmCC",
    )
]
CAFE_NFC = unicodedata.normalize("NFC", "café")  # c a f U+00E9
CAFE_NFD = unicodedata.normalize("NFD", "café")  # c a f e U+0301
assert CAFE_NFC != CAFE_NFD
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("KDLIB_DATA", "KDLIB_DEBUG", "RANK", "LOCAL_RANK")},
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONUNBUFFERED": "1",
}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_INDEX_CACHE", str(tmp_path / "index-cache"))
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _notes(err: str, start: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(start)]


# ---------------------------------------------------------------- the fingerprint stays what it was


def _golden_folder(root: Path) -> None:
    """Nested folders, an upper-case extension, hidden files, a symlinked folder and file, a non-ASCII
    class: all read as before. The .txt/.webp files were skipped before too (now they are noted)."""
    _write(root / "cat" / "a.png", PNGS[0])
    _write(root / "cat" / "B.PNG", PNGS[1])
    _write(root / "cat" / "sub" / "deep" / "c.png", PNGS[2])
    _write(root / "cat" / ".hidden" / "h.png", PNGS[0])
    _write(root / "cat" / "notes.txt", b"not an image")
    _write(root / "cat" / "x.webp", b"RIFF\0\0\0\0WEBP")
    _write(root / "dog" / "d.png", PNGS[1])
    _write(root.parent / "extra" / "e.png", PNGS[2])
    os.symlink(root.parent / "extra", root / "dog" / "linked")  # a plain folder symlink: followed
    os.symlink(root / "cat" / "a.png", root / "dog" / "f.png")  # a symlinked file: read
    _write(root / CAFE_NFC / "g.png", PNGS[0])


def test_fingerprint_of_a_folder_listed_before_is_unchanged(tmp_path):
    root = tmp_path / "golden"
    _golden_folder(root)
    src = open_source(str(root))
    assert src.classes == [CAFE_NFC, "cat", "dog"]  # sorted by code point, as before
    assert src._files == [f"{CAFE_NFC}/g.png", "cat/B.PNG", "cat/a.png", "cat/sub/deep/c.png",
                          "dog/d.png", "dog/f.png", "dog/linked/e.png"]  # fmt: skip
    # computed by kdlib/source.py as it was before issue 20 (git show HEAD:kdlib/source.py), same folder
    assert src.fingerprint() == "a7856fbbb8ad4014683e82e722bad0c9c2f62b53a7742967d4b60f1d56678d4e"


# ---------------------------------------------------------------- row 3: a folder symlink that loops back


def test_symlink_loops_are_followed_once_and_noted(tmp_path, capsys):
    root = tmp_path / "loops"
    for i, name in enumerate(("cat/a.png", "cat/b.png", "dog/c.png", "dog/sub/d.png")):
        _write(root / "train" / name, PNGS[i % 3])
    _write(tmp_path / "elsewhere" / "e.png", PNGS[2])
    os.symlink("..", root / "train" / "cat" / "loop")  # -> train/: the class folder's parent
    os.symlink(".", root / "train" / "dog" / "sub" / "self")  # -> the folder holding it
    os.symlink("../..", root / "train" / "dog" / "sub" / "up")  # -> train/
    os.symlink("itself", root / "train" / "dog" / "itself")  # resolves to itself: ELOOP
    os.symlink(tmp_path / "elsewhere", root / "train" / "dog" / "more")  # not a loop: listed
    src = open_source(str(root))
    assert src._files == ["cat/a.png", "cat/b.png", "dog/c.png", "dog/more/e.png", "dog/sub/d.png"]
    assert src.labels().tolist() == [0, 0, 1, 1, 1]
    assert src.sizes().shape == (5, 2) and len(src.fingerprint()) == 64
    err = capsys.readouterr().err
    (note,) = _notes(err, "note: skipped 4 symlinks")
    assert f"under {root / 'train'} " in note
    for link in ("cat/loop", "dog/itself", "dog/sub/self"):
        assert link in note, note
    assert "and 1 more" in note and "each real folder is listed once" in note

    open_source(str(root))  # the same listing again in this process: no second note
    assert _notes(capsys.readouterr().err, "note:") == []


def test_symlink_loop_in_the_cli_is_one_note_not_a_traceback(tmp_path):
    """The issue's case, run as a user would: `ln -s .. train/cat/loop`, then train (and eval on test/);
    the same run has .webp/.txt files in train/ and an NFD test folder for the NFC training class."""
    root = tmp_path / "data"
    for split, n in (("train", 4), ("test", 2)):
        for c, cls in enumerate(("cat", "dog", CAFE_NFC if split == "train" else CAFE_NFD)):
            for i in range(n):
                _write(root / split / cls / f"{i}.png", PNGS[(c + i) % 3])
    os.symlink("..", root / "train" / "cat" / "loop")
    for name in ("a.webp", "b.webp", "c.webp", "readme.txt"):
        _write(root / "train" / "dog" / name, b"not read")
    out = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "kdlib", "train", "--data", str(root), "--recipe", str(REPO / "precompute" / "plain.yaml"),
         "--epochs", "1", "--batch-size", "4", "--workers", "2", "--cpu", "--out", str(out)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "error:" not in p.stderr, p.stderr[-3000:]
    train = root / "train"
    assert _notes(p.stderr, "note: skipped 1 symlink ") == [
        f"note: skipped 1 symlink under {train} that loops back to a folder above it or to itself (cat/loop): "
        "each real folder is listed once"
    ], p.stderr
    assert _notes(p.stderr, "note: skipped 4 files") == [
        f"note: skipped 4 files kdlib does not read under {train} (.webp: 3, .txt: 1); "
        "kdlib reads .jpg, .jpeg and .png, in any case"
    ], p.stderr
    assert len(_notes(p.stderr, f"note: {root / 'test'}: class folder ")) == 1, p.stderr
    steps = (out / "steps.jsonl").read_text().splitlines()
    assert len(steps) == 3  # 12 training PNGs / batch 4, listed once (not again through loop/)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["split"] == "test" and result["images"] == 6  # the NFD folder's images are evaluated


# ---------------------------------------------------------------- row 6: NFC and NFD class folder names


def test_nfd_test_folder_is_the_nfc_training_class(tmp_path, capsys):
    root = tmp_path / "uni"
    _write(root / "train" / CAFE_NFC / "a.png", PNGS[0])
    _write(root / "train" / "dog" / "b.png", PNGS[1])
    _write(root / "test" / CAFE_NFD / "c.png", PNGS[2])
    _write(root / "test" / "dog" / "d.png", PNGS[0])
    train_fp = open_source(str(root)).fingerprint()
    test = open_source(str(root), "test")
    assert test.classes == [CAFE_NFC, "dog"] and test.labels().tolist() == [0, 1]
    assert test._files == [f"{CAFE_NFD}/c.png", "dog/d.png"]
    assert test.decode(0).shape == (3, 4, 4)  # the file is found under its folder's real name
    assert open_source(str(root)).fingerprint() == train_fp
    (note,) = _notes(capsys.readouterr().err, "note:")
    assert note == (
        f"note: {root / 'test'}: class folder '{CAFE_NFD}' (U+0063 U+0061 U+0066 U+0065 U+0301) is the training "
        f"split's class '{CAFE_NFC}' (U+0063 U+0061 U+0066 U+00E9): names are compared after Unicode NFC normalisation"
    )


def test_a_class_really_missing_from_train_shows_code_points(tmp_path):
    root = tmp_path / "uni"
    _write(root / "train" / CAFE_NFC / "a.png", PNGS[0])
    _write(root / "train" / "dog" / "b.png", PNGS[1])
    cafe_grave = unicodedata.normalize("NFD", "cafè")  # another accent: not the training class
    _write(root / "test" / cafe_grave / "c.png", PNGS[2])
    with pytest.raises(SourceError) as e:
        open_source(str(root), "test")
    assert str(e.value) == (
        f"{root / 'test'}: class folder(s) ['{cafe_grave}' (U+0063 U+0061 U+0066 U+0065 U+0300)] are not classes "
        "of the training split (2 classes) (names are compared after Unicode NFC normalisation; the closest "
        f"training class is '{CAFE_NFC}' (U+0063 U+0061 U+0066 U+00E9)); rename or remove them"
    )


def test_nfc_and_nfd_folders_of_one_class_in_one_split_are_refused(tmp_path, capsys):
    root = tmp_path / "uni"
    _write(root / "train" / CAFE_NFC / "a.png", PNGS[0])
    _write(root / "test" / CAFE_NFC / "b.png", PNGS[1])
    _write(root / "test" / CAFE_NFD / "c.png", PNGS[2])
    with pytest.raises(SourceError, match="are the same class after Unicode NFC normalisation: merge them"):
        open_source(str(root), "test")
    assert capsys.readouterr().err == ""  # the error alone, no note before it


# ---------------------------------------------------------------- row 7: files kdlib does not read


def test_unread_files_are_counted_in_one_note(tmp_path, capsys):
    root = tmp_path / "mixed"
    _write(root / "cat" / "a.png", PNGS[0])
    _write(root / "cat" / "B.PNG", PNGS[1])  # upper case: read
    _write(root / "dog" / "c.png", PNGS[2])
    for name in ("cat/x.webp", "cat/y.WEBP", "dog/sub/z.webp", "dog/anim.gif", "dog/labels.txt", "dog/LICENSE"):
        _write(root / name, b"not read")
    _write(root / "cat" / ".DS_Store", b"hidden: neither read nor counted")
    _write(root / "README.txt", b"beside the class folders: not counted")
    src = open_source(str(root))
    assert src._files == ["cat/B.PNG", "cat/a.png", "dog/c.png"] and src.labels().tolist() == [0, 0, 1]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert _notes(captured.err, "note:") == [
        f"note: skipped 6 files kdlib does not read under {root} (.webp: 3, (no extension): 1, .gif: 1, .txt: 1); "
        "kdlib reads .jpg, .jpeg and .png, in any case"
    ]
    digest, fingerprint = src.listing_digest, src.fingerprint()

    open_source(str(root))  # reopened (another command step, the store's check): said once
    assert _notes(capsys.readouterr().err, "note:") == []

    # unread files are not part of the listing: the index cache and the fingerprint keep their key
    _write(root / "cat" / "w.webp", b"not read")
    again = open_source(str(root))
    assert (again.listing_digest, again.fingerprint()) == (digest, fingerprint)
    (note,) = _notes(capsys.readouterr().err, "note:")
    assert note.startswith("note: skipped 7 files kdlib does not read") and "(.webp: 4," in note


def test_a_class_folder_of_unread_files_only_says_what_it_holds(tmp_path):
    _write(tmp_path / "cat" / "a.png", PNGS[0])
    _write(tmp_path / "dog" / "a.webp", b"not read")
    _write(tmp_path / "dog" / "b.webp", b"not read")
    with pytest.raises(SourceError) as e:
        open_source(str(tmp_path))
    assert str(e.value) == (
        f"class folder {tmp_path / 'dog'} has no .jpg/.jpeg/.png files (it holds 2 files kdlib does not read: "
        ".webp: 2): remove it or add images"
    )


def test_only_the_main_process_prints_the_note(tmp_path):
    """Ranks of `accelerate launch` list the folder too: one line, from rank 0."""
    _write(tmp_path / "cat" / "a.png", PNGS[0])
    _write(tmp_path / "cat" / "a.webp", b"not read")
    code = f"from kdlib.source import open_source; open_source({str(tmp_path)!r})"
    err = {}
    for rank in ("0", "1"):
        env = {**ENV, "RANK": rank, "LOCAL_RANK": rank, "KDLIB_INDEX_CACHE": "off"}
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        err[rank] = p.stderr
    assert len(_notes(err["0"], "note: skipped 1 file kdlib does not read")) == 1 and err["1"] == ""
