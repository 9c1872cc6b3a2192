"""One molecule-by-seed table from several runs of ``bench/suite.py``, with issue 19's targets counted.

    .venv/bin/python bench/suite_table.py RESULTS.jsonl... [--title T] [--out TABLE.md]

Reads the JSONL files that ``bench/suite.py`` writes (one record per molecule and seed) in the
order given; where two files hold the same molecule and seed, the later file's record is used, so
list older files first. Each cell: FSC 0.5 against the truth, the share of images more than 20°
off and the median pose error (both modulo the molecule's true symmetry), **stuck** where the run
never left the plateau, and the file it came from (a footnote number). A run meets the targets when
it is not stuck, its map is at most 1.5x Nyquist, its median pose error at most 3° and under 5 % of
its images are more than 20° off. Prints the Markdown table (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

MAX_X_NYQUIST = 1.5  # issue 19's targets
MAX_MEDIAN_DEG = 3.0
MAX_SHARE_OVER_20 = 0.05


def read_records(paths: list[Path]) -> dict[tuple[str, int], tuple[dict, int]]:
    """``(molecule, seed) -> (record, index of its file)``; later files win."""
    records: dict[tuple[str, int], tuple[dict, int]] = {}
    for index, path in enumerate(paths):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (str(record["molecule"]), int(record["seed"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise SystemExit(f"{path}:{number}: not a bench/suite.py record ({exc})") from None
            records[key] = (record, index)
    return records


def _median(record: dict) -> float:
    value = record.get("pose_error_median_mod_sym_deg")
    return record["pose_error_median_deg"] if value is None else value


def meets_targets(record: dict) -> bool:
    """Not stuck, ≤ 1.5x Nyquist, median ≤ 3° and under 5 % more than 20° off."""
    return (
        not record["stuck"]
        and record["resolution_x_nyquist"] <= MAX_X_NYQUIST
        and _median(record) <= MAX_MEDIAN_DEG
        and record["share_over_20_deg"] < MAX_SHARE_OVER_20
    )


def cell(record: dict, footnote: int) -> str:
    text = (
        f"{record['resolution_angstrom']:.1f} Å, {100 * record['share_over_20_deg']:.0f} %, "
        f"{_median(record):.1f}°"
    )
    if record["stuck"]:
        text = f"**{text}, stuck**"
    elif not meets_targets(record):
        text = f"*{text}*"
    return f"{text} [{footnote}]"


def table(paths: list[Path], title: str) -> str:
    records = read_records(paths)
    molecules = sorted({m for m, _ in records})
    seeds = sorted({s for _, s in records})
    lines = [
        f"# {title}",
        "",
        "| molecule (Å/px, 1.5x Nyquist) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
    ]
    lines.append("|---" * (len(seeds) + 1) + "|")
    for molecule in molecules:
        apix = next(r["pixel_size_angstrom"] for (m, _), (r, _) in records.items() if m == molecule)
        row = [f"{molecule} ({apix:.2f}, {2 * MAX_X_NYQUIST * apix:.1f} Å)"]
        for seed in seeds:
            found = records.get((molecule, seed))
            row.append("-" if found is None else cell(found[0], found[1] + 1))
        lines.append("| " + " | ".join(row) + " |")
    runs = [r for r, _ in records.values()]
    met = sum(meets_targets(r) for r in runs)
    stuck = sum(bool(r["stuck"]) for r in runs)
    lines += [
        "",
        "Each cell: FSC 0.5 against the truth, share of images more than 20° off and median pose error "
        "(modulo the true symmetry); *italic*: misses a target (≤ 1.5x Nyquist, median ≤ 3°, under 5 % "
        "more than 20° off); **bold**: stuck on the plateau.",
        f"Runs: {len(runs)}; meet every target: {met}; stuck: {stuck}.",
        "",
        "Sources:",
    ]
    lines += [f"[{i + 1}] `{path.name}`" for i, path in enumerate(paths)]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", nargs="+", type=Path, help="bench/suite.py result files, older first")
    parser.add_argument("--title", default="The molecule suite")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    for path in args.jsonl:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    text = table(args.jsonl, args.title)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
