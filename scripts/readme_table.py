"""Copy docs/bench.md into README.md between the bench markers (used by bench.py --readme)."""
import re
import sys
from pathlib import Path


def update(readme: Path, table: str) -> None:
    text = readme.read_text()
    pattern = re.compile(r"(<!-- bench:start[^>]*-->\n).*?(<!-- bench:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: no <!-- bench:start --> ... <!-- bench:end --> markers")
    readme.write_text(pattern.sub(lambda m: m.group(1) + table.rstrip() + "\n" + m.group(2), text))


if __name__ == "__main__":
    update(Path(sys.argv[1]), Path(sys.argv[2]).read_text())
