"""Parsing a raw I->R output (`### Response ... ### Tests ...`, SelfCodeAlign's response format)
into the response text, its code and its tests. An output that does not parse gets a reason;
parsing never raises."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

RESPONSE = "### Response"
TESTS = "### Tests"
# A fenced block: ``` with an optional language tag, up to the next fence at a line start.
FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
# Another section header after the tests (a model continuing with the next few-shot example).
NEXT_SECTION = re.compile(r"^### ", re.M)
MAIN_GUARD = re.compile(r"^if __name__ == ['\"]__main__['\"]:", re.M)


@dataclass
class Parsed:
    response: str = ""  # the text of the Response section (what SFT trains on)
    code: str = ""  # its code blocks, joined
    tests: str = ""  # the Tests section's code blocks, joined
    error: Optional[str] = None  # why the output did not parse; None when it did


def code_blocks(text: str) -> list[str]:
    """The bodies of the fenced blocks tagged python (or untagged)."""
    return [body for tag, body in FENCE.findall(text) if tag.lower() in ("", "python", "py", "python3")]


def parse_response(raw: str) -> Parsed:
    # The I->R prompt ends in "### Response\n", so the output may start inside the section.
    start = raw.find(RESPONSE)
    body = raw[start + len(RESPONSE):] if start >= 0 else raw
    split = body.find(TESTS)
    if split < 0:
        return Parsed(error="no tests section")
    response, tests = body[:split].strip(), body[split + len(TESTS):]
    end = NEXT_SECTION.search(tests)
    if end:
        tests = tests[:end.start()]
    code, test_code = code_blocks(response), code_blocks(tests)
    if not response:
        return Parsed(error="empty response")
    if not code:
        return Parsed(response=response, error="no code block in response")
    if not test_code:
        return Parsed(response=response, code="\n".join(code), error="no code block in tests")
    return Parsed(response, "\n".join(code), "\n".join(test_code))


def program(parsed: Parsed) -> str:
    """The program validation runs: the response's code, then its tests. Code reading `input`
    is cut at its `if __name__ == "__main__":` (as the reference does), which would block."""
    code = parsed.code
    if "input(" in code:
        guard = MAIN_GUARD.search(code)
        if guard:
            code = code[:guard.start()]
    return code.rstrip() + "\n\n\n" + parsed.tests.strip() + "\n"
