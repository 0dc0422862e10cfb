"""The exit-code table: every error class that can end a run maps to the code the README documents."""

import pytest

from internevo_jax import errors


@pytest.mark.parametrize(
    "error, code",
    [
        (errors.ConfigError("x"), 2),
        (errors.TokenizerError("x"), 2),
        (errors.CheckpointError("x"), 3),
        (errors.CheckpointMismatch("x"), 3),
        (errors.FolderInUse("x"), 3),
        (errors.DataError("x"), 5),
        (errors.TrainingDiverged("x"), 6),
        (errors.RunFolderError("x"), 7),
    ],
)
def test_exit_codes(error, code):
    assert errors.exit_code_of(error)[0] == code


def test_a_bug_has_no_exit_code():
    assert errors.exit_code_of(KeyError("x")) is None and errors.exit_code_of(OSError("x")) is None
