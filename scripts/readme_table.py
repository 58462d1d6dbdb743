"""Copy a generated table into README.md between its markers (``<!-- bench:start -->`` ...
``<!-- bench:end -->`` for bench.py, ``ladder`` for ladder_credit.py)."""
import re
import sys
from pathlib import Path


def update(readme: Path, table: str, marker: str = "bench") -> None:
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- {marker}:start[^>]*-->\n).*?(<!-- {marker}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no <!-- {marker}:start --> ... <!-- {marker}:end --> markers")
    readme.write_text(pattern.sub(lambda m: m.group(1) + table.rstrip() + "\n" + m.group(2), text))


if __name__ == "__main__":
    update(Path(sys.argv[1]), Path(sys.argv[2]).read_text())
