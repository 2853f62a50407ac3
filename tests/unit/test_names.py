import pytest

from services.common.errors import InvalidArgument
from services.common.names import AdapterSelector, parse_selector, validate_name


@pytest.mark.parametrize("name", ["a", "policy", "my-adapter.v2", "x_1", "0abc", "a" * 64])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "a/b", "A", "-a", ".a", "a..b", "a" * 65, "a b", "a@b", "é"])
def test_invalid_names(name):
    with pytest.raises(InvalidArgument):
        validate_name(name)


@pytest.mark.parametrize("text,expected", [
    ("pol", AdapterSelector("pol", 0)),
    ("pol@latest", AdapterSelector("pol", 0)),
    ("pol@v17", AdapterSelector("pol", 17)),
])
def test_selectors(text, expected):
    assert parse_selector(text) == expected
    assert str(parse_selector(text)) in (f"{expected.name}@latest", f"{expected.name}@v{expected.version}")


@pytest.mark.parametrize("text", ["pol@v0", "pol@17", "pol@", "@v1", "pol@v1@v2", "../x@v1", "pol@vx"])
def test_bad_selectors(text):
    with pytest.raises(InvalidArgument):
        parse_selector(text)
