"""`loraloop bench rollout` arguments: rounds per shape, and bad input refused."""

from __future__ import annotations

import pytest

from services.bench import rollout as bench


def test_short_runs_get_more_rounds_unless_repeats_is_given():
    a = bench.parse_args([])
    assert a.repeats is None
    assert [bench.rounds_for(s, a.repeats) for s in ("tiny", "25m", "0.5b")] == [15, 10, 5]
    a = bench.parse_args(["--repeats", "3"])
    assert [bench.rounds_for(s, a.repeats) for s in ("tiny", "25m", "0.5b")] == [3, 3, 3]
    assert bench.rounds_for("tiny", bench.parse_args(["--quick"]).repeats) == 1


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--models", "huge"], ["--seqs", "10", "--mixed", "3"]])
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err
