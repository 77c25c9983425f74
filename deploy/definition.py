"""The state machine's definition lives in one file, deploy/state_machine.asl.json (what
asl-validator checks and the tests walk); the template embeds a copy of it between two
marker lines (what cfn-lint checks and CloudFormation deploys). `python -m deploy.definition`
rewrites that copy from the file; the tests fail while the two differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFINITION = HERE / "state_machine.asl.json"
TEMPLATE = HERE / "template.yaml"
BEGIN = "# BEGIN state_machine.asl.json"
END = "# END state_machine.asl.json"


def definition() -> dict[str, Any]:
    return json.loads(DEFINITION.read_text(encoding="utf-8"))


def embedded(template_text: str) -> str:
    """The template with the definition's copy rewritten from the file."""
    lines = template_text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
    end = next(i for i, line in enumerate(lines) if line.strip() == END)
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    body = json.dumps(definition(), indent=2).splitlines()
    block = [f"{indent}{line}\n" for line in body]
    return "".join(lines[: start + 1] + block + lines[end:])


def main() -> None:
    TEMPLATE.write_text(embedded(TEMPLATE.read_text(encoding="utf-8")), encoding="utf-8")


if __name__ == "__main__":
    main()
