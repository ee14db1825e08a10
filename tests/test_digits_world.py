"""The shipped digits world: the pretrained policy follows prompts with CFG."""

import json

import numpy as np
import torch
from safetensors import safe_open

from reward_workers.digits import HeldoutSVM
from samplers import digits
from samplers.policy import load_velocity
from samplers.sampler import Sampler
from samplers.text import PromptEncoder


def test_shipped_policy_draws_the_prompted_digit_with_cfg():
    torch.set_num_threads(2)
    sampler = Sampler(load_velocity(digits.POLICY_FILE), PromptEncoder().encode, digits.to_uint8,
                      digits.IMAGE_SHAPE, num_steps=10, keep_states=False)
    n = 30
    traj = sampler.rollout(digits.default_prompts(), n, [1000 + i for i in range(10)], cfg_scale=2.0)
    accuracy = (HeldoutSVM().predict(traj.images) == np.repeat(np.arange(10), n)).mean()
    assert accuracy >= 0.90, accuracy


def test_shipped_policy_records_how_it_was_made():
    with safe_open(str(digits.POLICY_FILE), framework="pt") as f:
        report = json.loads(f.metadata()["pretrain_report"])
    assert report["command"].startswith("fmrl pretrain-digits")
    assert report["eval"]["cfg_2.0"]["svm_accuracy"] >= 0.9
