"""GSM8K scoring: the final number of a generation against the reference (layerroute.tasks.gsm8k)."""

from __future__ import annotations

import gzip
import json

import pytest

from layerroute.errors import DataError
from layerroute.tasks.gsm8k import (
    GSM8K_SPLITS,
    extract_final_number,
    gsm8k_exact_match,
    normalize_number,
    packaged_gsm8k,
)

# ---------------------------------------------------------------------------------------------------------
# GSM8K
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("so she has 5 left.\n#### -3", "-3"),
        ("The answer is 42.", "42"),
        ("The answer is: $18 per day.", "18"),
        ("the final answer is 42.0", "42"),
        ("Answer: 0.50", "0.5"),
        ("answer = .5", "0.5"),
        ("We get \\boxed{42}.", "42"),
        ("So \\boxed{\\$1,250} in total.", "1250"),
        ("\\boxed{\\text{18 dollars}}", "18"),
        ("\\boxed{-7}", "-7"),
        ("First 3 + 4 = 7, then 7 * 6 = 42 apples", "42"),
        ("It costs $2,500.", "2500"),
        ("He lost \u22125 points", "-5"),
        ("pages 3-4 were torn", "4"),
        ("The answer is 25%.", "25"),
        ("The answer is 42. Check: 6*7 = 42, with 3 extra steps", "42"),
        ("#### 10\nThe answer is 12", "10"),
        ("1,2345 units", "2345"),
        ("no digits here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


@pytest.mark.parametrize(
    "generated, reference, match",
    [
        ("The answer is 42.", "42", True),
        ("The answer is 42.0", "He has 6*7 = 42 apples.\n#### 42", True),
        ("\\boxed{1,234}", "#### 1234", True),
        ("The answer is $1,234.00", "1234", True),
        ("The answer is 43.", "#### 42", False),
        ("The answer is -42", "42", False),
        ("I don't know", "42", False),
        (None, "42", False),
        ("0.5", "1/2 = 0.50\n#### 0.5", True),
    ],
)
def test_gsm8k_exact_match(generated, reference, match):
    assert gsm8k_exact_match(generated, reference) is match


def test_gsm8k_reference_without_number_raises():
    with pytest.raises(DataError):
        gsm8k_exact_match("42", "no number")


def test_normalize_number():
    assert normalize_number("$1,234.50") == "1234.5"
    assert normalize_number("-0") == "0"
    assert normalize_number("007") == "7"
    assert normalize_number("abc") is None


def test_real_gsm8k_references_all_have_a_final_number():
    # Real GSM8K ships in the package (layerroute/data/gsm8k), where the offline configs read it.
    files = [packaged_gsm8k(split) for split in GSM8K_SPLITS]
    rows = [json.loads(line) for f in files for line in gzip.decompress(f.read_bytes()).decode().splitlines()
            if line.strip()]
    assert len(rows) == 7473 + 1319
    for row in rows:
        final = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert extract_final_number(row["answer"]) == normalize_number(final)
        assert gsm8k_exact_match(f"So the answer is {final}.", row["answer"])
