"""CI on Python 3.11 cannot go green by skipping the parity tests: a missing torch (or another module of the extras
CI installs there) stops the session instead of skipping (#19)."""

from .conftest import CI_REQUIRED_ON_311, missing_ci_modules


def only_torch_missing(name):
    return None if name == "torch" else object()


def test_missing_torch_is_an_error_in_ci_on_311():
    assert missing_ci_modules({"CI": "true"}, (3, 11), only_torch_missing) == ["torch"]
    assert missing_ci_modules({"CI": "true"}, (3, 11), lambda name: None) == list(CI_REQUIRED_ON_311)


def test_elsewhere_a_missing_module_is_only_a_skip():
    assert missing_ci_modules({}, (3, 11), only_torch_missing) == []  # a laptop
    assert missing_ci_modules({"CI": "true"}, (3, 12), only_torch_missing) == []  # no torch build for 3.12 CI
    assert missing_ci_modules({"CI": "true"}, (3, 11), lambda name: object()) == []
