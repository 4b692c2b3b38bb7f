"""precsearch.errors: first_line (one-line error text) and check_int (int validators)."""

import numpy as np
import pytest

from precsearch.errors import CompileError, ConfigError, PrecsearchError, check_int, first_line


# --------------------------------------------------------------------------- first_line


def test_first_line_keeps_only_the_first_line():
    assert first_line(ValueError("bad value\nsecond line\nthird")) == "bad value"


def test_first_line_skips_leading_blank_lines():
    assert first_line(RuntimeError("\n\n  padded message\nrest")) == "padded message"


def test_first_line_of_an_empty_message_is_the_type_name():
    assert first_line(KeyboardInterrupt()) == "KeyboardInterrupt"
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError("   \n  ")) == "ValueError"


def test_first_line_with_type_puts_the_type_first():
    assert first_line(ValueError("text"), with_type=True) == "ValueError: text"
    assert first_line(ValueError("text\nmore"), with_type=True) == "ValueError: text"


def test_first_line_with_type_of_an_empty_message_is_the_type_name_alone():
    assert first_line(ValueError(), with_type=True) == "ValueError"


def test_first_line_with_type_names_precsearch_subclasses():
    exc = CompileError("failed", pass_name="Legalize", layer_id="conv3")
    assert first_line(exc, with_type=True) == "CompileError: [pass 'Legalize', layer 'conv3'] failed"


def test_first_line_drops_the_sqlalchemy_driver_prefix():
    exc = RuntimeError("(sqlite3.OperationalError) disk I/O error\n[SQL: SELECT 1]\n(Background on this error at: x)")
    assert first_line(exc) == "disk I/O error"
    assert first_line(exc, with_type=True) == "RuntimeError: disk I/O error"


def test_first_line_drops_a_dotted_psycopg_prefix():
    exc = RuntimeError("(psycopg.errors.UndefinedTable) relation \"x\" does not exist")
    assert first_line(exc) == 'relation "x" does not exist'


def test_first_line_keeps_parentheses_that_are_not_a_leading_prefix():
    assert first_line(ValueError("shape (1, 3) is wrong")) == "shape (1, 3) is wrong"
    # No space after the parenthesis: not a driver prefix.
    assert first_line(ValueError("(a)b")) == "(a)b"


def test_first_line_of_a_bare_driver_prefix_is_the_type_name():
    # Removing the prefix leaves nothing: the type name stands in, as for an empty message.
    assert first_line(RuntimeError("(sqlite3.OperationalError) "), with_type=True) == "RuntimeError: (sqlite3.OperationalError)"
    assert first_line(RuntimeError("(sqlite3.OperationalError) \nrest")) == "RuntimeError"


# --------------------------------------------------------------------------- check_int


@pytest.mark.parametrize("value", [1, 2, 10**12, np.int64(1), np.int32(5), np.uint8(1)])
def test_check_int_accepts_ints_at_or_above_the_minimum(value):
    assert check_int(value, "x", "f", 1) is None


def test_check_int_accepts_the_minimum_itself_for_any_minimum():
    check_int(0, "x", "f", 0)
    check_int(-3, "x", "f", -3)
    check_int(np.int16(7), "x", "f", 7)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 1.0, 2.5, "3", "1", [1], None, 0, -1, np.int64(0)])
def test_check_int_rejects_non_ints_and_values_below_the_minimum(value):
    with pytest.raises(ConfigError):
        check_int(value, "x", "f", 1)


def test_check_int_exact_message_and_types():
    with pytest.raises(ConfigError) as info:
        check_int(0, "x", "f", 1)
    assert str(info.value) == "The 'x' parameter of f must be an int >= 1; got 0 instead."
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, PrecsearchError)


def test_check_int_message_quotes_the_offending_value():
    with pytest.raises(ConfigError) as info:
        check_int("3", "count", "load_batches", 1)
    assert str(info.value) == "The 'count' parameter of load_batches must be an int >= 1; got '3' instead."
    with pytest.raises(ConfigError) as info:
        check_int(True, "workers", "search", 1)
    assert str(info.value) == "The 'workers' parameter of search must be an int >= 1; got True instead."


def test_check_int_none_only_with_allow_none():
    assert check_int(None, "x", "f", 1, allow_none=True) is None
    with pytest.raises(ConfigError) as info:
        check_int(None, "x", "f", 1)
    assert str(info.value) == "The 'x' parameter of f must be an int >= 1; got None instead."


def test_check_int_allow_none_still_checks_values_and_says_or_none():
    with pytest.raises(ConfigError) as info:
        check_int(0, "trials", "search", 1, allow_none=True)
    assert str(info.value) == "The 'trials' parameter of search must be an int >= 1 or None; got 0 instead."
    check_int(1, "trials", "search", 1, allow_none=True)
