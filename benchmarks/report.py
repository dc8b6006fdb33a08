"""Collect the latest result tables (benchmarks/results/*.json) into benchmarks/README.md.

Copies each run's own table, with its date, command and machine, between the README's
`<!-- results -->` markers; nothing is recomputed or edited. Without --write, prints them.

    .venv/bin/python benchmarks/report.py --write
"""

from __future__ import annotations

import argparse
import json

import _common as C

ORDER = [
    "replay_overhead",
    "online_speedup",
    "precompute_efficiency",
    "decode_amortization",
    "storage",
    "memory",
    "scale_on_paper",
]
BEGIN, END = "<!-- results -->", "<!-- /results -->"


def section(name: str) -> str:
    path = C.RESULTS / f"{name}.json"
    if not path.exists():
        return f"### {name}\n\nnot run yet (`.venv/bin/python benchmarks/{name}.py`)\n"
    doc = json.loads(path.read_text())
    m = doc["machine"]
    where = (
        m.get("gpu") or f"{m['cpu_model']}, {m['cpus_usable']} CPUs, torch {m['torch']} ({m['torch_threads']} threads)"
    )
    load = m.get("load_average_at_start")
    load_s = f"; load average at start {load[0]:.1f} on {m['cpus_usable']} CPUs (shared machine)" if load else ""
    return (
        f"### {name}\n\n`{doc['command']}` -- {doc['date']}, {where}, kdlib {m.get('kdlib')} "
        f"(git {m.get('git_commit')}{', kdlib/ modified' if m.get('git_dirty') else ''}){load_s}\n\n"
        f"{doc['table_markdown']}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="replace the results section of benchmarks/README.md")
    args = ap.parse_args()
    text = "\n".join(section(n) for n in ORDER)
    if not args.write:
        print(text)
        return
    readme = C.HERE / "README.md"
    doc = readme.read_text()
    a, b = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    readme.write_text(doc[:a] + "\n\n" + text + "\n" + doc[b:])
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
