"""Planted functions that break each of filter_dataset.py's rules are dropped with that rule as
the reason; clean ones are kept."""

from starcoder.selfalign.seeds import extract_functions, read_sources, rule_broken, seeds

CLEAN = '''
import math
from collections import Counter


def circle_area(radius):
    """Area of a circle of the given radius."""
    return math.pi * radius ** 2


def most_common_letter(text: str) -> str:
    """The letter that occurs most often in `text`, ties broken alphabetically."""
    counts = Counter(ch for ch in text.lower() if ch.isalpha())
    return min(counts, key=lambda ch: (-counts[ch], ch))


@staticmethod
def clamp(value, low=0, high=1):
    r"""`value` limited to [low, high]."""
    if value < low:
        return low
    return min(value, high)
'''

BROKEN = '''
import os
import subprocess as sp


def single_quoted(x):
    \'\'\'A docstring in single quotes.\'\'\'
    return x


def undocumented(x):
    return x * 2


def has_todo(values):
    """Sum of the values."""
    # TODO: handle None
    return sum(values)


def debug_word(values):
    """Mean of the values, printed in debug mode."""
    return sum(values) / len(values)


def joins_paths(a, b):
    """The two paths joined."""
    return os.path.join(a, b)


def runs_a_command(cmd):
    """Runs cmd and returns its output."""
    return sp.run(cmd, capture_output=True).stdout


def imports_inside(args):
    """Parses command-line arguments."""
    import argparse
    return argparse.ArgumentParser().parse_args(args)


def no_arguments():
    """The answer."""
    return 42


def no_return(items):
    """Prints the items."""
    for item in items:
        print(item)


def longest(strings):
    """The longest string."""
    if not strings:
        return None

    maxlen = max(len(x) for x in strings)
    for s in strings:
        if len(s) == maxlen:
            return s


def circle_area_again(radius):
    """Area of a circle of the given radius."""
    return math.pi * radius ** 2
'''

LONG = 'def long_function(x):\n    """Counts up."""\n' + "    x += 1\n" * 150 + "    return x\n"

EXPECTED = {
    'no """ docstring': 2,  # single_quoted, undocumented
    "todo/fixme/bug": 2,  # has_todo, debug_word (the reference's substring rule: "debug" has "bug")
    "banned import": 3,  # os (the file's import it uses), subprocess as sp, argparse inside
    "over 150 lines": 1,
    "no arguments": 1,
    "no return": 1,
    "benchmark substring": 1,  # HumanEval/12's canonical solution
    "near-duplicate": 1,  # circle_area_again: circle_area renamed
}


def test_planted_rule_breakers_are_dropped_and_clean_functions_kept(tmp_path):
    (tmp_path / "a_clean.py").write_text(CLEAN)  # read first: the survivor
    (tmp_path / "broken.py").write_text("import math\n" + BROKEN)
    (tmp_path / "long.py").write_text(LONG)
    (tmp_path / "bad.py").write_text("def broken(:\n")
    kept, report = seeds(read_sources([tmp_path]))
    assert sorted(s["name"] for s in kept) == ["circle_area", "clamp", "most_common_letter"]
    assert dict(report.drops) == EXPECTED
    assert report.records_in == 3 + 11 + 1 and report.records_out == 3
    assert report.extra == {"files": 4, "files_unparsable": 1}


def test_a_seed_carries_the_imports_it_uses():
    (area, letter, clamp) = extract_functions(CLEAN, "clean.py")
    assert area["seed"].startswith("import math\n\n\ndef circle_area(radius):")
    assert letter["seed"].startswith("from collections import Counter\n\n\ndef most_common")
    assert clamp["seed"].startswith("@staticmethod\ndef clamp") and clamp["lineno"] == 17
    assert rule_broken(area["seed"]) is None
    # A form feed is no line break to ast: the function's lines stay where ast says they are.
    (f,) = extract_functions('x = 1  # \x0c page\n\ndef f(a):\n    """F."""\n    return a\n')
    assert f["seed"] == 'def f(a):\n    """F."""\n    return a\n' and f["lineno"] == 3
