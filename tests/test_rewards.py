"""Rule rewards (GSM8K with verl's semantics, reasoning-gym scorers) and users' reward functions."""
import json
import re

import pytest

from hybridrl import HybridRLError
from hybridrl.config import RewardConfig
from hybridrl.data import prepare_gsm8k, prepare_reasoning_gym, read_rows
from hybridrl.rewards import (default_compute_score, extract_final_answer, gsm8k_compute_score, gsm8k_extract,
                              load_reward_fn, reasoning_gym_compute_score)


# ---------------------------------------------------------------- GSM8K

def test_gsm8k_every_reference_answer_scores_one(tmp_path):
    rows = read_rows(prepare_gsm8k(tmp_path))
    assert len(rows) == 1319
    scores = [gsm8k_compute_score(r["extra_info"]["answer"], r["reward_model"]["ground_truth"]) for r in rows]
    assert scores == [1.0] * 1319


@pytest.mark.parametrize("text, strict, flexible", [
    ("So she makes 9 * 2 = 18 dollars.\n#### 18", 1.0, 1.0),
    ("The answer is 18", 0.0, 1.0),                      # no '####': strict finds nothing
    ("#### 1,018", 1.0, 0.0),                             # strict drops commas, flexible keeps them ("1,018")
    ("#### 17\nwait, no.\n#### 18", 1.0, 1.0),            # the last '####' wins
    ("#### 18\nor maybe 19", 1.0, 0.0),                   # flexible takes the last number
    ("The answer is 18.", 0.0, 0.0),                      # flexible keeps the '.' ("18.") as verl does
    ("#### 18" + " padding" * 50, 0.0, 0.0),              # only the last 300 characters count
    ("no numbers here", 0.0, 0.0),
    ("#### -18", 0.0, 0.0),
])
def test_gsm8k_strict_and_flexible(text, strict, flexible):
    gt = "1018" if "1,018" in text else "18"
    assert gsm8k_compute_score(text, gt, method="strict") == strict
    assert gsm8k_compute_score(text, gt, method="flexible") == flexible


def test_gsm8k_format_score_only_when_something_was_extracted():
    assert gsm8k_compute_score("#### 17", "18", format_score=0.1) == 0.1
    assert gsm8k_compute_score("seventeen", "18", format_score=0.1) == 0.0
    assert gsm8k_compute_score("#### 18", "18", score=2.0) == 2.0
    assert gsm8k_extract("3 and 4 .", "flexible") == "4"  # a lone "." is skipped (verl)
    assert gsm8k_extract("3 and 4 ..", "flexible") == ".."  # but ".." is not, as in verl
    with pytest.raises(HybridRLError, match="strict or flexible"):
        gsm8k_extract("#### 1", "loose")


# ---------------------------------------------------------------- reasoning-gym

@pytest.mark.parametrize("text, answer", [
    ("Let me see.\nAnswer: -4", "-4"),
    ("The answer is 12.", "12"),
    ("**Answer:** 12", "12"),
    ("<answer>7</answer> and more", "7"),
    ("5 - 3 - 6 = -4.", "-4"),
    ("  42  \n", "42"),
    ("", ""),
])
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


def test_reasoning_gym_round_trip(tmp_path):
    rows = read_rows(prepare_reasoning_gym("basic_arithmetic", 10, tmp_path, seed=1)["train"])
    fn = load_reward_fn(RewardConfig())
    for r in rows:
        gt, extra = r["reward_model"]["ground_truth"], r["extra_info"]
        right = fn(r["data_source"], f"Let me compute.\nAnswer: {gt}", gt, extra)
        wrong = fn(r["data_source"], f"Answer: {int(gt) + 1}", gt, extra)
        assert right == {"score": 1.0}
        assert wrong["score"] < 1.0


def test_reasoning_gym_scores_tasks_that_use_metadata(tmp_path):
    rows = read_rows(prepare_reasoning_gym("countdown", 3, tmp_path, seed=0)["train"])
    for r in rows:
        entry = json.loads(r["extra_info"]["entry"])
        gt = r["reward_model"]["ground_truth"]  # an expression; the scorer evaluates it against metadata
        assert reasoning_gym_compute_score(r["data_source"], f"Answer: {gt}", gt, r["extra_info"]) == 1.0
        assert reasoning_gym_compute_score(r["data_source"], "Answer: 1+1", gt, r["extra_info"]) < 1.0
        assert entry["metadata"]


def test_reasoning_gym_without_stored_entry_uses_ground_truth():
    assert reasoning_gym_compute_score("reasoning_gym/basic_arithmetic", "Answer: 5", "5", None) == 1.0
    assert reasoning_gym_compute_score("reasoning_gym/basic_arithmetic", "Answer: 6", "5", {}) == 0.0


# ---------------------------------------------------------------- dispatch and users' functions

def test_default_dispatch_and_unknown_source():
    assert default_compute_score("openai/gsm8k", "#### 3", "3") == 1.0
    with pytest.raises(HybridRLError, match=r"no built-in reward for data_source 'my/task'.*custom_reward_function.path"):
        default_compute_score("my/task", "x", "y")


def test_default_reward_fn_uses_config_method_and_format_score():
    fn = load_reward_fn(RewardConfig(gsm8k_method="flexible", format_score=0.25))
    assert fn("openai/gsm8k", "it is 18", "18", {}) == {"score": 1.0}
    assert fn("openai/gsm8k", "it is 17", "18", {}) == {"score": 0.25}
    assert load_reward_fn(RewardConfig())("openai/gsm8k", "it is 18", "18", {}) == {"score": 0.0}


USER_FILE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return 1.0 if ground_truth in solution_str else 0.0

def with_details(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": len(solution_str), "source": data_source, "k": (extra_info or {}).get("k")}

def no_score(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1}
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(USER_FILE)
    return str(path)


def test_custom_reward_float(user_file):
    fn = load_reward_fn(RewardConfig(custom_path=user_file))  # custom_name defaults to compute_score
    assert fn("any/source", "the answer is 42", "42", None) == {"score": 1.0}
    assert fn("any/source", "the answer is 41", "42", None) == {"score": 0.0}


def test_custom_reward_dict(user_file):
    fn = load_reward_fn(RewardConfig(custom_path=user_file, custom_name="with_details"))
    out = fn("src", "abc", "x", {"k": 7})
    assert out == {"score": 3.0, "source": "src", "k": 7} and isinstance(out["score"], float)


def test_custom_reward_dict_without_score(user_file):
    fn = load_reward_fn(RewardConfig(custom_path=user_file, custom_name="no_score"))
    with pytest.raises(HybridRLError, match="without 'score'"):
        fn("src", "abc", "x", None)


def test_custom_reward_file_not_found(tmp_path):
    with pytest.raises(HybridRLError, match=r"custom reward file .*missing.py not found.*custom_reward_function.path"):
        load_reward_fn(RewardConfig(custom_path=str(tmp_path / "missing.py")))


def test_custom_reward_function_not_found(user_file):
    with pytest.raises(HybridRLError, match=r"has no function 'score_fn' \(functions: \['compute_score', 'with_details', "
                                            r"'no_score'\]\).*custom_reward_function.name"):
        load_reward_fn(RewardConfig(custom_path=user_file, custom_name="score_fn"))


def test_custom_reward_file_that_fails_to_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import no_such_module_xyz\n")
    with pytest.raises(HybridRLError, match="failed to import.*no_such_module_xyz"):
        load_reward_fn(RewardConfig(custom_path=str(path)))


# ---------------------------------------------------------------- scoring a batch: hangs, errors, bad values

def scored(n=3, source="src"):
    from hybridrl.types import Sample

    return [Sample(prompt_ids=[1], index=i, data_source=source, ground_truth="1", response_text=f"answer {i}")
            for i in range(n)]


def test_score_samples_sets_reward_and_extras_in_order():
    from hybridrl.rewards import score_samples

    def fn(data_source, text, ground_truth, extra_info=None):
        return {"score": float(text[-1]), "len": len(text)}

    samples = scored(20)
    score_samples(samples, fn, timeout_s=5, workers=4)
    assert [s.reward for s in samples] == [float(str(i)[-1]) for i in range(20)]
    assert samples[3].reward_extra == {"len": 8}


def test_score_samples_with_a_hanging_reward_times_out():
    import threading
    import time

    from hybridrl.rewards import score_samples

    release = threading.Event()

    def hangs(data_source, text, ground_truth, extra_info=None):
        if text.endswith("1"):
            release.wait(30)   # never returns within the test; released at the end
        return 0.0

    t0 = time.monotonic()
    with pytest.raises(HybridRLError, match=r"reward function .*hangs did not return within 0.3 s \(reward.timeout_s\) "
                                            r"on sample 1 \(data_source 'src', response 'answer 1'\)"):
        score_samples(scored(3), hangs, timeout_s=0.3)
    assert time.monotonic() - t0 < 3
    release.set()


def test_score_samples_is_interruptible():
    import _thread
    import threading
    import time

    from hybridrl.rewards import score_samples

    release = threading.Event()
    threading.Timer(0.3, _thread.interrupt_main).start()   # Ctrl-C while a call hangs
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        score_samples(scored(1), lambda *a: release.wait(30), timeout_s=60)
    assert time.monotonic() - t0 < 3
    release.set()


def test_score_samples_with_a_raising_reward():
    from hybridrl.rewards import score_samples

    def boom(data_source, text, ground_truth, extra_info=None):
        if text.endswith("2"):
            raise ZeroDivisionError("division by zero")
        return 1.0

    with pytest.raises(HybridRLError, match=r"reward function .*boom raised ZeroDivisionError: division by zero on "
                                            r"sample 2 \(data_source 'math', response 'answer 2'\)"):
        score_samples(scored(3, "math"), boom, timeout_s=5)


@pytest.mark.parametrize("value, shown", [(float("nan"), "nan as the score"), (float("inf"), "inf as the score"),
                                          (-float("inf"), "-inf as the score"), ("0.5", "str '0.5' as the score"),
                                          ({"score": None}, "NoneType 'None' as the score")])
def test_score_samples_rejects_non_finite_and_non_numbers(value, shown):
    from hybridrl.rewards import score_samples

    def bad(data_source, text, ground_truth, extra_info=None):
        return value

    with pytest.raises(HybridRLError, match=rf"reward function .*bad returned {re.escape(shown)}.*\(on sample 0 "
                                            r"\(data_source 'src', response 'answer 0'\)\)"):
        score_samples(scored(1), bad, timeout_s=5)


def test_score_samples_names_the_users_function_in_its_file(user_file, tmp_path):
    from hybridrl.rewards import score_samples

    path = tmp_path / "nan_reward.py"
    path.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return float('nan')\n")
    fn = load_reward_fn(RewardConfig(custom_path=str(path)))
    with pytest.raises(HybridRLError, match=rf"reward function compute_score in {re.escape(str(path))} returned nan "
                                            r"as the score.*on sample 0"):
        score_samples(scored(1), fn, timeout_s=5)
    samples = scored(2)
    score_samples(samples, load_reward_fn(RewardConfig(custom_path=user_file)), timeout_s=5)
    assert [s.reward for s in samples] == [0.0, 1.0]   # ground truth "1" is only in "answer 1"
