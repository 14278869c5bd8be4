"""Print the README's config reference (a Markdown table) from the config dataclasses.

    python scripts/config_reference.py            # print it
    python scripts/config_reference.py --write    # replace README.md's copy
    python scripts/config_reference.py --check    # exit 1 when README.md's copy is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

from ddpm_mnist.config import reference_rows

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, meaning in reference_rows():
        lines.append(f"| `{key}` | `{default}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines)


def main() -> int:
    text = table()
    path = Path(__file__).resolve().parents[1] / "README.md"
    readme = path.read_text()
    if "--write" in sys.argv:
        before, rest = readme.split(BEGIN, 1)
        path.write_text(f"{before}{BEGIN}\n{text}\n{END}{rest.split(END, 1)[1]}")
    elif "--check" in sys.argv:
        current = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip() if BEGIN in readme else ""
        if current != text:
            print("README.md's config reference is stale: run scripts/config_reference.py --write", file=sys.stderr)
            return 1
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
