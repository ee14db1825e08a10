"""Digits rewards: prompt parsing, the shipped classifier's held-out accuracy, the SVM."""

import numpy as np
import pytest

import reward_workers.digits as reward_digits
from reward_workers.digits import DigitsClassifierReward, HeldoutSVM, load_split, prompt_digit


@pytest.fixture(scope="module")
def split():
    return load_split()


def test_split_is_fixed_and_disjoint(split):
    assert split.train_images.shape == (1437, 8, 8) and split.heldout_images.shape == (360, 8, 8)
    assert np.bincount(split.heldout_labels).min() >= 35  # stratified
    again = load_split()
    assert np.array_equal(again.heldout_labels, split.heldout_labels)


@pytest.mark.parametrize("prompt,digit", [("a handwritten seven", 7), ("the digit Zero", 0),
                                          ("3, written by hand", 3), ("a picture of the number nine", 9)])
def test_prompt_digit(prompt, digit):
    assert prompt_digit(prompt) == digit


@pytest.mark.parametrize("prompt", ["a handwritten cat", "one or two", "seventy"])
def test_prompt_digit_rejects(prompt):
    with pytest.raises(ValueError, match="exactly one digit"):
        prompt_digit(prompt)


def test_shipped_classifier_heldout_accuracy(split):
    r = DigitsClassifierReward()
    images = split.heldout_images[..., None]
    prompts = [f"a handwritten {['zero','one','two','three','four','five','six','seven','eight','nine'][y]}"
               for y in split.heldout_labels]
    out = r(images, prompts)
    assert out.scores.shape == (360,) and np.all((out.scores >= 0) & (out.scores <= 1))
    assert out.details["correct"].mean() >= 0.97
    # the reward is the probability of the prompted digit: asking for the wrong one scores low
    wrong = [p.replace(p.split()[-1], "one" if "one" not in p else "two") for p in prompts]
    assert r(images, wrong).scores.mean() < 0.1


def test_svm_is_a_different_accurate_model(split):
    svm = HeldoutSVM(split)
    assert svm.heldout_accuracy >= 0.97


def test_bad_batches_are_named():
    r = DigitsClassifierReward()
    with pytest.raises(ValueError, match="uint8"):
        r(np.zeros((2, 8, 8, 1), np.float32), ["a handwritten one"] * 2)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        r(np.zeros((2, 8, 8, 1), np.uint8), ["a handwritten one"])
    with pytest.raises(ValueError, match="8×8"):
        r(np.zeros((2, 16, 16, 1), np.uint8), ["a handwritten one"] * 2)


def test_reward_reads_every_prompt_the_policy_was_trained_on():
    # samplers and reward_workers may not import each other, so each names the digits;
    # this keeps the two lists in step
    from samplers import digits

    assert digits.DIGIT_WORDS == reward_digits.DIGIT_WORDS
    for d in range(10):
        for t in range(len(digits.TEMPLATES)):
            assert prompt_digit(digits.prompt_for(d, t)) == d
