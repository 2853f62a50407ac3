import json
import math
import sys

import pytest

from services.rollout.rewards import (
    BUILTINS,
    RewardResult,
    arithmetic_exact,
    gsm8k,
    load_reward_fn,
    math_answer,
    score,
)

# ---- plugins for load_reward_fn / score, loaded back through this module's import name


def my_reward(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 0.25, "length": len(solution_str)}


def two_args(solution_str, ground_truth):
    return 1.0


NOT_CALLABLE = 3


def _returning(value):
    return lambda data_source, solution_str, ground_truth, extra_info=None: value


def _raising(exc):
    def fn(data_source, solution_str, ground_truth, extra_info=None):
        raise exc
    return fn


# ---- arithmetic


@pytest.mark.parametrize("solution,truth", [
    ("11", "11"),
    ("11<eos>", "11"),
    ("11<eos><pad><pad>", "11"),
    ("  11 \n", "11"),
    ("<bos>11<eos>", "11"),
    ("05<eos>", "05"),
    ("11<eos>99", "11"),  # what follows eos was never part of the answer
])
def test_arithmetic_correct(solution, truth):
    assert arithmetic_exact("arith", solution, truth) == 1.0


@pytest.mark.parametrize("solution,truth", [
    ("5", "05"),  # exact only: unpadded is wrong
    ("5<eos>", "05"),
    ("12", "11"),
    ("111", "11"),
    ("1", "11"),
    ("", "11"),
    ("<eos>11", "11"),  # eos first: empty answer
    ("1<pad>1", "11"),  # specials are stripped from the ends only
    ("11=", "11"),
    ("+11", "11"),
])
def test_arithmetic_wrong(solution, truth):
    assert arithmetic_exact("arith", solution, truth) == 0.0


# ---- gsm8k


@pytest.mark.parametrize("solution,truth", [
    ("She has 3+4=7 apples.\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("#### $1,234", "1234"),
    ("#### 42.0", "42"),
    ("#### -5", "-5"),
    ("#### 18.", "18"),  # sentence period after the number
    ("first #### 3 then corrected #### 4", "4"),  # the last one counts
    ("#### 72", "Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72"),  # full GSM8K solution
    ("#### 1234", "1,234"),
])
def test_gsm8k_correct(solution, truth):
    assert gsm8k("openai/gsm8k", solution, truth) == 1.0


@pytest.mark.parametrize("solution,truth", [
    ("#### 3 then corrected #### 4", "3"),
    ("The answer is 42", "42"),  # no #### at all
    ("####42", "42"),  # verl strict format needs the space
    ("#### forty-two", "42"),
    ("#### 1.2.3", "123"),  # not a number
    ("#### -42", "42"),
    ("#### 4", "42"),
    ("", "42"),
])
def test_gsm8k_wrong(solution, truth):
    assert gsm8k("openai/gsm8k", solution, truth) == 0.0


def test_gsm8k_non_numeric_ground_truth_is_an_error_not_a_zero():
    with pytest.raises(ValueError, match="ground truth"):
        gsm8k("openai/gsm8k", "#### 1", "many")
    r = score(gsm8k, "openai/gsm8k", "#### 1", "many")
    assert r.score == 0.0 and r.error is not None and "ValueError" in r.error


# ---- math


@pytest.mark.parametrize("solution,truth", [
    (r"so $\boxed{\frac{1}{2}}$", "0.5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\tfrac{1}{2}}", r"\dfrac{1}{2}"),
    (r"\boxed{0.5}", "1/2"),
    (r"\boxed{.5}", "0.5"),
    (r"\boxed{-\frac{3}{4}}", "-0.75"),
    (r"\boxed{\frac{-3}{4}}", "-0.75"),
    (r"\boxed{1} wait, no: \boxed{2}", "2"),  # the last box counts
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),
    (r"\boxed{90^\circ}", "90"),
    (r"\boxed{90^{\circ}}", "90"),
    (r"\boxed{\text{(B)}}", "(B)"),
    (r"\boxed{10\!000}", "10000"),
    (r"\boxed{x \rightarrow \infty}", r"x\rightarrow\infty"),
    (r"\boxed{\sqrt{\frac{a}{b}}}", r"\sqrt{\frac{a}{b}}"),  # nested, compared as strings
    ("The answer is 7.", "7"),
    ("So the answer is: $\\frac{2}{3}$. Done.", "2/3"),
    ("the Answer is 0.3333333", "1/3"),  # 3.3e-8 absolute, 1e-7 relative: within 1e-6
    (r"\boxed{1000000}", "1000000.5"),  # 0.5 / 1e6 = 5e-7 relative
])
def test_math_correct(solution, truth):
    assert math_answer("math", solution, truth) == 1.0


@pytest.mark.parametrize("solution,truth", [
    ("no final answer here: 0.5", "0.5"),  # neither \boxed nor "answer is"
    (r"\boxed{\frac{1}{3}}", "0.5"),
    (r"\boxed{0.333}", "1/3"),  # 3.3e-4 absolute, 1e-3 relative: outside 1e-6
    (r"\boxed{1000000}", "1000002"),  # 2e-6 relative
    (r"\boxed{\frac{1}{2}", "1/2"),  # unclosed box: generation was cut off
    (r"\boxed{}", ""),  # empty answer never matches
    (r"\boxed{2} and the answer is 3", "3"),  # a box beats "answer is"
    (r"\boxed{\frac{1}{0}}", "0"),
    (r"\boxed{(1,2)}", "(2,1)"),
    (r"\boxed{-0.5}", "0.5"),
    (r"\boxed{\rightarrow}", "arrow"),  # \right is stripped only as a whole command
])
def test_math_wrong(solution, truth):
    assert math_answer("math", solution, truth) == 0.0


# ---- score(): interpreting what a reward returns


@pytest.mark.parametrize("value,expected", [(1.0, 1.0), (0.5, 0.5), (True, 1.0), (False, 0.0), (3, 3.0), (-2, -2.0)])
def test_score_accepts_numbers(value, expected):
    r = score(_returning(value), "d", "s", "g")
    assert r == RewardResult(expected, {}, None)
    assert type(r.score) is float


def test_score_keeps_dict_extras_as_json_details():
    fn = _returning({"score": 0.75, "acc": True, "pred": "42", "n": 3, "ratio": 0.5, "nan": float("nan"),
                     "obj": [1, 2]})
    r = score(fn, "d", "s", "g")
    assert r.score == 0.75 and r.error is None
    assert r.details == {"acc": True, "pred": "42", "n": 3, "ratio": 0.5, "nan": "nan", "obj": "[1, 2]"}
    json.loads(json.dumps(r.details, allow_nan=False))  # strict JSON: no NaN leaks through


def test_score_passes_all_four_arguments_positionally():
    seen = []

    def fn(a, b, c, d):
        seen.append((a, b, c, d))
        return 1

    assert score(fn, "src", "sol", "gt", {"k": 1}).score == 1.0
    assert seen == [("src", "sol", "gt", {"k": 1})]


def test_score_records_exception_with_its_type():
    r = score(_raising(ZeroDivisionError("boom")), "d", "s", "g")
    assert r.score == 0.0
    assert r.error is not None and "ZeroDivisionError" in r.error and "boom" in r.error


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), {"score": float("nan")}])
def test_score_rejects_non_finite(value):
    r = score(_returning(value), "d", "s", "g")
    assert r.score == 0.0 and r.error is not None and "finite" in r.error


@pytest.mark.parametrize("value", [1e39, -1e39, 10**40, {"score": 3.5e38}])
def test_score_past_float32_is_an_error_not_a_reward_the_learner_refuses(value):
    """The learner trains in float32 and refuses a group with a reward past its range
    (trajectories.finite32); scored as it came, every lease of that prompt would be refused and
    leased again, forever."""
    from services.common.trajectories import finite32

    r = score(_returning(value), "d", "s", "g")
    assert r.score == 0.0 and r.error is not None and "outside float32's range" in r.error
    assert not finite32(float(value["score"] if isinstance(value, dict) else value))
    edge = score(_returning(3.4e38), "d", "s", "g")  # just inside: kept as it is
    assert edge.score == 3.4e38 and edge.error is None and finite32(edge.score)


def test_score_dict_without_score_is_an_error_with_details_kept():
    r = score(_returning({"acc": 1.0}), "d", "s", "g")
    assert r.score == 0.0 and r.error is not None and "'score'" in r.error
    assert r.details == {"acc": 1.0}


@pytest.mark.parametrize("value", [None, "1.0", [1.0], {"score": "1"}, {"score": None}])
def test_score_rejects_wrong_types(value):
    r = score(_returning(value), "d", "s", "g")
    assert r.score == 0.0 and r.error is not None


def test_score_lets_keyboard_interrupt_through():
    with pytest.raises(KeyboardInterrupt):
        score(_raising(KeyboardInterrupt()), "d", "s", "g")


def test_reward_result_score_must_be_finite():
    with pytest.raises(ValueError):
        RewardResult(math.nan)


def test_builtins_through_score():
    assert score(load_reward_fn("arithmetic"), "arith", "11<eos>", "11") == RewardResult(1.0)
    assert score(load_reward_fn("gsm8k"), "gsm8k", "#### 1,234", "1234") == RewardResult(1.0)
    assert score(load_reward_fn("math"), "math", r"\boxed{\frac{1}{2}}", "0.5") == RewardResult(1.0)
    assert score(load_reward_fn("math"), "math", "nothing", "0.5") == RewardResult(0.0)


# ---- load_reward_fn


def test_load_builtins():
    assert load_reward_fn("arithmetic") is arithmetic_exact
    assert load_reward_fn("gsm8k") is gsm8k
    assert load_reward_fn(" math ") is math_answer
    assert set(BUILTINS) == {"arithmetic", "arithmetic_prefix", "gsm8k", "math", "by_data_source"}


def test_by_data_source_scores_as_verls_default_does():
    """verl's default_compute_score: the scorer is chosen by the row's data_source."""
    f = load_reward_fn("by_data_source")
    assert score(f, "openai/gsm8k", "so #### 72", "72").score == 1.0
    assert score(f, "openai/gsm8k", "so #### 71", "72").score == 0.0
    assert score(f, "lighteval/MATH", "the answer is \\boxed{3/4}", "\\frac{3}{4}").score == \
        score(math_answer, "lighteval/MATH", "the answer is \\boxed{3/4}", "\\frac{3}{4}").score
    unknown = score(f, "my/dataset", "x", "y")
    assert unknown.score == 0.0 and "no built-in reward for data_source 'my/dataset'" in unknown.error


def test_arithmetic_prefix_scores_the_answer_where_a_full_length_response_starts():
    f = load_reward_fn("arithmetic_prefix")
    assert f("arithmetic", "11<eos>7+2=09", "11") == 1.0
    assert f("arithmetic", "<bos> 11 3+", "11") == 1.0
    assert f("arithmetic", "1", "11") == 0.0
    assert f("arithmetic", "x11", "11") == 0.0
    assert f("arithmetic", "05", "05") == 1.0 and f("arithmetic", "5", "05") == 0.0


def test_load_module_function():
    # __name__ is how pytest imported this file, so the loader must hand back this very object.
    fn = load_reward_fn(f"{__name__}:my_reward")
    assert fn is my_reward
    assert sys.modules[__name__].my_reward is fn
    assert score(fn, "d", "abc", "g") == RewardResult(0.25, {"length": 3})


def test_load_builtin_by_module_path():
    assert load_reward_fn("services.rollout.rewards:gsm8k") is gsm8k


def test_unknown_builtin_lists_valid_names():
    with pytest.raises(ValueError, match="unknown reward 'gsm9k'") as e:
        load_reward_fn("gsm9k")
    for name in ("arithmetic", "gsm8k", "math"):
        assert name in str(e.value)


def test_module_that_fails_to_import_is_a_value_error(tmp_path, monkeypatch):
    (tmp_path / "broken_reward_mod.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="RuntimeError: no config"):
        load_reward_fn("broken_reward_mod:compute_score")
    sys.modules.pop("broken_reward_mod", None)


@pytest.mark.parametrize("spec,message", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'.*ModuleNotFoundError"),
    (f"{__name__}:missing", "has no attribute 'missing'"),
    (f"{__name__}:NOT_CALLABLE", "int, not callable"),
    (f"{__name__}:two_args", "cannot be called as"),
    (":f", "bad reward spec"),
    ("json:", "bad reward spec"),
    ("a:b:c", "bad reward spec"),
    ("../evil.py:f", "bad reward spec"),
    ("/tmp/x.py:f", "bad reward spec"),
    (".relative:f", "bad reward spec"),
    ("json:loads.x", "bad reward spec"),
])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_fn(spec)
