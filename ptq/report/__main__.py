"""`python -m ptq.report merge DIR... [--reports-dir DIR] [--run-id ID]`: one leaderboard (Markdown, JSON,
HTML, figures) from the records of several runs or shards (each DIR holds `<cell id>.json` records)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ptq.errors import PtqError
from ptq.report.records import check_folder, validate_record
from ptq.report.write import write_reports


def read_record(path: Path) -> dict:
    """One record file, checked against the schema; a damaged one stops the merge, naming it."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        validate_record(record)
    except (OSError, ValueError) as exc:  # unreadable; not UTF-8, not JSON or not the schema (ValueErrors)
        raise SystemExit(f"merge: {path} is not a readable cell record ({type(exc).__name__}: {exc}); "
                         "restore it from the run that wrote it, or move it out of the folder") from None
    return record


def read_records(folders: list[Path]) -> list[dict]:
    """Every record under the folders; a cell present twice (two shards ran it) is an error."""
    records: dict[str, tuple[Path, dict]] = {}
    for folder in folders:
        if not folder.is_dir():
            raise SystemExit(f"merge: {folder} is not a folder of records")
        for path in sorted(folder.glob("*.json")):
            record = read_record(path)
            if record["cell_id"] in records:
                raise SystemExit(f"merge: {record['cell_id']} is in both {records[record['cell_id']][0]} and {path}")
            records[record["cell_id"]] = (path, record)
    if not records:
        raise SystemExit(f"merge: no records (<cell id>.json) in {', '.join(map(str, folders))}")
    return [record for _path, record in records.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ptq.report")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="build one leaderboard from the records of several runs or shards")
    merge.add_argument("folders", nargs="+", type=Path)
    merge.add_argument("--reports-dir", type=Path, default=Path("reports"))
    merge.add_argument("--run-id", help="default: the records' run id when they share one, else 'merged'")
    args = parser.parse_args(argv)
    try:
        check_folder(args.reports_dir, "--reports-dir")
    except PtqError as exc:
        raise SystemExit(f"merge: {exc}") from None
    records = read_records(args.folders)
    run_ids = {record["run_id"] for record in records}
    run_id = args.run_id or (run_ids.pop() if len(run_ids) == 1 else "merged")
    written = write_reports(records, args.reports_dir, run_id)
    print(f"merged {len(records)} records into {', '.join(str(path) for path in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
