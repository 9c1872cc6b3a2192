"""``bench/suite_table.py``: records from several suite files become one table, later files win, and
issue 19's targets are counted from each record's own figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _record(molecule: str, seed: int, **changes) -> dict:
    record = {
        "molecule": molecule,
        "seed": seed,
        "pixel_size_angstrom": 2.0,
        "stuck": False,
        "resolution_angstrom": 5.0,  # 1.25x Nyquist (4 Å)
        "resolution_x_nyquist": 1.25,
        "pose_error_median_deg": 90.0,
        "pose_error_median_mod_sym_deg": 2.0,
        "share_over_20_deg": 0.01,
    }
    record.update(changes)
    return record


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_later_files_win_and_the_targets_are_counted(tmp_path):
    old = _write(
        tmp_path / "old.jsonl", [_record("a", 0, stuck=True, resolution_x_nyquist=5.0), _record("b", 0)]
    )
    new = _write(
        tmp_path / "new.jsonl",
        [
            _record("a", 0),  # replaces the stuck record of old.jsonl
            _record("a", 1, share_over_20_deg=0.05),  # 5 % is not under 5 %
            _record("b", 1, pose_error_median_mod_sym_deg=None, pose_error_median_deg=3.5),
        ],
    )
    out = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite_table.py"), str(old), str(new), "--out", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    text = out.read_text()
    assert text == result.stdout
    rows = {
        line.split(" ")[1]: line
        for line in text.splitlines()
        if line.startswith("| a ") or line.startswith("| b ")
    }
    assert "5.0 Å, 1 %, 2.0° [2]" in rows["a"] and "stuck" not in rows["a"]
    assert "*5.0 Å, 5 %, 2.0°* [2]" in rows["a"]
    assert "5.0 Å, 1 %, 2.0° [1]" in rows["b"]  # seed 0 of b only in old.jsonl
    assert "*5.0 Å, 1 %, 3.5°* [2]" in rows["b"]  # no symmetry: the raw median counts
    assert "Runs: 4; meet every target: 2; stuck: 0." in text


def test_a_line_that_is_not_a_record_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_record("a", 0)) + '\n{"seed": 1}\n')
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "suite_table.py"), str(bad)], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert f"{bad}:2: not a bench/suite.py record" in result.stderr
