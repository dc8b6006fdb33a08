"""`kdlib demo --quick` end to end (the real CLI, tiny settings): the table, its numbers and the picture."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_demo_quick_writes_table_numbers_and_picture(tmp_path):
    out, shards = tmp_path / "runs", tmp_path / "shards"
    proc = subprocess.run(
        [sys.executable, "-m", "kdlib", "demo", "--quick", "--out", str(out), "--shards", str(shards)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]

    table = (out / "demo.md").read_text()
    assert table in proc.stdout  # the printed table is the one written next to the runs
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| ") and not line.startswith("| run") and not line.startswith("| ---")
    ]
    assert len(rows) == 5  # teacher, two students from the store, online KD, CE
    assert rows[0].startswith("| teacher ")
    assert [r.split(" | ")[0] for r in rows[1:]] == [
        "| resnet8, KL from the store",
        "| resnet8, DIST from the store",
        "| resnet8, KL online (teacher in memory)",
        "| resnet8, CE on labels",
    ]
    for row in rows[1:]:
        _, top1, agreement, seconds, ratio = [c.strip() for c in row.strip("|").split("|")]
        assert 0.0 <= float(top1) <= 1.0 and 0.0 <= float(agreement) <= 1.0
        assert float(seconds) > 0 and re.fullmatch(r"[0-9.]+x", ratio)
    assert re.search(r"Best student from the store \((KL|DIST)\): 0\.\d{4} top-1, (beats|does NOT beat) CE", table)

    result = json.loads((out / "demo.json").read_text())
    assert [r["kind"] for r in result["students"]] == ["cached", "cached", "online", "ce"]
    for r in result["students"]:
        assert r["curve"] and all(0.0 <= top1 <= 1.0 for _, top1 in r["curve"])
        assert r["train_s"] > 0 and (Path(r["out"]) / "model.safetensors").exists()
    assert 0.0 <= result["teacher"]["top1"] <= 1.0
    assert result["teacher"]["train_s"] > 0 and result["teacher"]["precompute_s"] > 0

    pytest.importorskip("matplotlib")
    png = out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
