"""One pydantic config tree for a training job, loaded from YAML with ``key=value`` overrides
(OmegaConf dotlists, read against the schema) and per-algorithm presets (``PRESETS``).

Every field is described; unknown keys and bad values are rejected with a message
that names them. Experiment files hold choices, never hardware arithmetic: how
samplers are placed follows from ``resources``.
"""

from __future__ import annotations

import difflib
import json
import re
import types
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from learner.settings import (
    ACFlowParams,
    AdvantageFlowParams,
    AWMParams,
    DiffusionNFTParams,
    FlowGRPOParams,
    LearnerSettings,
    ObjectiveName,
    ORWParams,
    TrackerParams,
)
from samplers.digits import default_prompts


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the problem."""


def _not_bool(v: Any) -> Any:
    # pydantic reads true as 1: `iterations: true` would run one iteration
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    return v


Int = Annotated[int, BeforeValidator(_not_bool)]
"""An int field: a bool is refused (tests/services/test_inputs.py walks the tree for this)."""
Float = Annotated[float, AllowInfNan(False), BeforeValidator(_not_bool)]
"""A float field: finite, and a bool is refused."""

WEEK_S = 7 * 24 * 3600  # the longest wait a config may ask for (timedelta and socket limits lie far beyond)
SEED_MAX = 2**32 - 1  # numpy's legacy seeding and every RNG we seed accept this range
MAX_SAMPLES_PER_PROMPT = 1024  # one prompt's samples go through the policy as one batch


class _Strict(BaseModel):
    # allow_inf_nan=False: every float of the tree is finite, whatever its annotation says
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


class RunConfig(_Strict):
    name: str | None = Field(None, description="Run directory name under out_dir; default: <config name>-<UTC time>.")
    out_dir: Path | str = Field(Path("runs"), description="Where run directories are created: a path (absolute "
                                "and shared under `ray job submit`, where a relative one is refused) or a URI "
                                "(file://, s3://, gs://: the run is staged locally and uploaded as it is written; "
                                "services/storage.py).")
    iterations: Int = Field(200, ge=1, description="Driver iterations: one rollout batch and its learner update(s) each.")
    seed: Int = Field(0, ge=0, le=SEED_MAX, description="Seeds rollout noise, learner draws and evaluation noise.")
    progress: bool = Field(True, description="Show a progress bar (iteration, reward, time left).")
    checkpoint_every: Int = Field(50, ge=0, description="Write a resumable checkpoint every this many iterations "
                                  "(0: only the final one); `fmrl train --resume runs/NAME` continues from the last.")
    keep_checkpoints: Int = Field(2, ge=1, description="Resumable checkpoints kept; older ones are deleted.")
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["jsonl"], description="Where per-iteration metrics, the config, evaluation grids "
        "and the summary go: metrics.jsonl (always, added if left out) and any of the trackers tensorboard "
        "(<run>/tensorboard), wandb (<run>/wandb; WANDB_MODE=offline keeps it off the network) and mlflow "
        "(MLFLOW_TRACKING_URI, else <run>/mlruns), each an extra: pip install 'fmrl[wandb]'.")

    @field_validator("loggers")
    @classmethod
    def _jsonl_always(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(["jsonl", *v]))

    @field_validator("out_dir", mode="before")
    @classmethod
    def _path_or_uri(cls, v: Any) -> Any:
        # a URI stays text (Path would fold "s3://b" into "s3:/b"); anything else is a path
        if isinstance(v, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", v):
            return v.rstrip("/")
        if isinstance(v, str):
            return Path(v)
        if not isinstance(v, Path):
            raise ValueError(f"must be a path or a URI, got {type(v).__name__}")
        return v

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (it names a directory)")
        return v


class LoRAConfig(_Strict):
    rank: Int = Field(32, ge=1, description="LoRA rank r.")
    alpha: Float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
                                      description="Transformer layers that get an adapter (names or suffixes).")

    @field_validator("target_modules")
    @classmethod
    def _some(cls, v: list[str]) -> list[str]:
        if not v or any(not m.strip() for m in v):
            raise ValueError("name at least one module, none blank")
        return v


class PolicyConfig(_Strict):
    kind: Literal["digits", "compose", "sd3"] = Field("digits", description="The policy family: the embedded "
                                                      "digits world, the compositional digits world (2×2 cells of "
                                                      "digits, docs/compose.md), or a Stable Diffusion 3 pipeline "
                                                      "(policy.pretrained).")
    checkpoint: Path | None = Field(None, description="digits, compose: policy safetensors to start from; default: "
                                    "the world's shipped model.")
    pretrained: str | None = Field(None, description="sd3: a StableDiffusion3Pipeline directory (save_pretrained "
                                   "layout), or a hub id where a hub is reachable. `fmrl make-tiny-sd3` writes a "
                                   "tiny random one.")
    resolution: Int = Field(512, ge=8, description="sd3: image side in pixels (a multiple of the VAE factor × patch size).")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="sd3: weights' dtype on the device.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="sd3: where samplers and the learner run "
                                                   "(auto: cuda when the actor has a GPU).")
    max_sequence_length: Int = Field(256, ge=1, le=512, description="sd3: T5 tokens per prompt.")
    lora: LoRAConfig | None = Field(None, description="Train a LoRA adapter instead of every weight (the reference "
                                    "is the adapter switched off; only the adapter is synced and checkpointed).")
    num_steps: Int = Field(10, ge=1, le=1000, description="Euler steps per rollout.")
    shift: Float = Field(1.0, gt=0, le=100, description="SD3 time shift of the sampling schedule (SD3 uses 3.0).")
    cfg_scale: Float = Field(1.0, ge=1.0, le=100, description="Classifier-free guidance scale of training rollouts "
                            "(1 = CFG-free).")
    sampler: Literal["ode", "sde", "sde_cps"] = Field("ode", description="Euler ODE rollouts, Flow-GRPO's SDE with "
                                                      "per-step log-probs, or the release's coefficients-preserving "
                                                      "SDE (sde_type cps; its log-prob drops every constant).")
    sde_a: Float = Field(0.7, gt=0, description="Noise level a of the SDE sampler: σ_t = a·sqrt(t/(1 − t)) (sde), "
                         "std = s·sin(a·π/2) (sde_cps).")
    sde_window_size: Int = Field(0, ge=0, description="Flow-GRPO-Fast: only this many consecutive steps per rollout "
                                 "are stochastic and recorded (the others Euler steps); 0: every step (Flow-GRPO).")
    sde_window_range: tuple[Int, Int] | None = Field(None, description="Flow-GRPO-Fast: the window's first step is "
                                                     "drawn uniformly from [lo, hi − size] per rollout call; default "
                                                     "(0, num_steps // 2), the release's.")

    @model_validator(mode="after")
    def _window_fits(self) -> PolicyConfig:
        if self.sde_window_size > 0:
            lo, hi = self.window_range
            if not (0 <= lo and hi <= self.num_steps and self.sde_window_size <= hi - lo):
                raise ValueError(f"policy.sde_window_size={self.sde_window_size} does not fit sde_window_range "
                                 f"[{lo}, {hi}) within num_steps={self.num_steps}")
            if self.sampler == "ode":
                raise ValueError("policy.sde_window_size needs an SDE sampler (policy.sampler: sde or sde_cps)")
        elif self.sde_window_range is not None:
            raise ValueError("policy.sde_window_range is used only with policy.sde_window_size > 0")
        return self

    @property
    def window_range(self) -> tuple[int, int]:
        """The Fast window's range: the given one, else the release's (0, num_steps // 2)."""
        return self.sde_window_range or (0, self.num_steps // 2)

    @property
    def sde_window(self) -> tuple[int, int, int] | None:
        """(size, lo, hi) for the sampler, or None without a window."""
        return (self.sde_window_size, *self.window_range) if self.sde_window_size > 0 else None


DatasetFormat = Literal["auto", "txt", "jsonl", "json", "csv", "parquet", "hf"]


class DatasetConfig(_Strict):
    """A prompt dataset: a file or a local Hugging Face ``datasets`` directory (services/datasets.py)."""

    path: Path = Field(description="A .txt (one prompt a line; blank lines and # comments skipped), .jsonl/.json "
                       "(objects with the prompt field plus metadata fields), .csv, .parquet, or a directory "
                       "written by datasets' save_to_disk.")
    format: DatasetFormat = Field("auto", description="The file's format; auto: from the suffix (a directory: hf).")
    split: str | None = Field(None, description="A DatasetDict directory: the split to read (default: its only "
                              "split, else 'train'); a file: keep only the rows whose 'split' field equals it.")
    prompt_field: str = Field("prompt", min_length=1, description="The field (column) holding the prompt; every "
                              "other field is the prompt's metadata, handed to the rewards.")
    shuffle: bool = Field(True, description="Shuffle the prompts anew each epoch (by seed); false: file order.")
    seed: Int = Field(0, ge=0, le=SEED_MAX, description="Seed of the per-epoch shuffles (and of eval.split_from_train).")


class RolloutConfig(_Strict):
    prompts: list[str] = Field(
        default_factory=default_prompts,
        description="Prompts cycled through by the driver (when no rollout.dataset is given).",
    )
    dataset: DatasetConfig | None = Field(
        None, description="Training prompts from a dataset instead of the inline list: epochs of "
        "prompts_per_iteration distinct prompts per iteration, shuffled per epoch (README, 'Bring your own prompts').")
    prompts_per_iteration: Int | None = Field(
        None, ge=1, description="Distinct prompts in one rollout batch, cycling through the list; default: all of them.")
    samples_per_prompt: Int = Field(16, ge=1, le=MAX_SAMPLES_PER_PROMPT,
                                    description="Rollouts of each prompt per iteration (the group size).")
    keep_states: bool = Field(True, description="Record intermediate states in trajectories (objectives on x_t need them).")

    @field_validator("prompts")
    @classmethod
    def _nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("the prompt list is empty; give at least one prompt")
        blank = [i for i, p in enumerate(v) if not p.strip()]
        if blank:
            raise ValueError(f"prompt(s) at index {blank} are blank")
        return v

    @property
    def batch_prompts(self) -> int:
        """The number of distinct prompts per rollout batch."""
        return self.prompts_per_iteration or len(self.prompts)

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        # the inline list keeps its default beside a dataset (a full dump carries both); a list
        # given with other prompts would be silently ignored, so it is refused
        if isinstance(data, dict) and data.get("dataset") is not None and data.get("prompts") is not None \
                and data["prompts"] != default_prompts():
            raise ValueError("give rollout.prompts or rollout.dataset, not both")
        return data

    @model_validator(mode="after")
    def _fits(self) -> RolloutConfig:
        if self.dataset is not None:
            if self.prompts_per_iteration is None:
                raise ValueError("rollout.dataset needs rollout.prompts_per_iteration (distinct prompts per batch)")
            return self  # checked against the dataset's size when it is read
        if self.prompts_per_iteration is not None and self.prompts_per_iteration > len(self.prompts):
            raise ValueError(f"prompts_per_iteration={self.prompts_per_iteration} exceeds the "
                             f"{len(self.prompts)} prompts given")
        return self


class ORWConfig(_Strict):
    tau: Float = Field(20.0, ge=0, le=100, description="Inverse temperature: w = exp(τ·r) (released code: 0.5; see docs/algorithms.md).")
    alpha: Float = Field(0.5, ge=0, description="Weight of the W2 regulariser α·‖v_θ − v_ref‖² (released code: 1).")
    normalize_weights: bool = Field(True, description="Divide w by its batch mean (an option; the released code does not).")
    coupling: Literal["independent", "minibatch_ot"] = Field("independent", description="Noise–sample coupling of the FM term.")


class TrackerConfig(_Strict):
    mode: Literal["buffer", "batch"] = Field("buffer", description="buffer: DDPO's running per-prompt buffers "
                                             "(buffer_size, min_count); batch: the released Flow-GRPO/DiffusionNFT "
                                             "tracker, statistics of the current batch only (eps 1e-4).")
    buffer_size: Int = Field(32, ge=1, description="buffer mode: rewards kept per prompt.")
    min_count: Int = Field(16, ge=1, description="buffer mode: below this many, a prompt is normalised with batch "
                           "statistics.")
    global_std: bool = Field(False, description="Divide prompt-centred rewards by a std over the whole batch: of "
                             "the centred rewards (buffer mode), of the raw rewards (batch mode, as released).")

    @model_validator(mode="after")
    def _reachable(self) -> TrackerConfig:
        if self.min_count > self.buffer_size:
            raise ValueError(f"min_count={self.min_count} exceeds buffer_size={self.buffer_size}: "
                             "per-prompt statistics could never be used")
        return self


class ACFlowConfig(_Strict):
    tau: Float = Field(2.0, ge=0, le=100, description="Temperature of the critic weighting g(τ·A).")
    alpha: Float = Field(1.0, ge=0, description="Weight of the W2 regulariser (≥ 1 with centre_weights).")
    weighting: Literal["exp", "linear", "softplus"] = Field("exp", description="Critic weighting family, normalised to mean 1.")
    shaping: Literal["none", "clip", "tanh"] = Field("tanh", description="Squash of per-prompt-normalised rewards.")
    shaping_limit: Float = Field(1.0, gt=0, description="Shaped rewards lie in [−limit, limit].")
    advantage_clip: Float | None = Field(1.0, gt=0, description="A_max: advantages clipped to ±A_max (null: no clipping).")
    warmup_steps: Int = Field(20, ge=0, description="K: learner steps during which the critic trains before it steers the actor.")
    warmup_actor: Literal["frozen", "orw"] = Field(
        "orw", description="During warm-up the actor trains on ORW weights exp(τ·r̃) of the shaped rewards (orw), "
        "or is frozen (frozen); both are the paper's. orw by default: on the bench a frozen warm-up costs about "
        "twice the rollouts to a reward threshold and ends no higher (docs/algorithms.md).")
    critic_lr: Float = Field(3e-3, gt=0, description="The critic's AdamW learning rate.")
    critic_steps: Int = Field(4, ge=1, description="Critic optimiser steps per learner step.")
    critic_width: Int = Field(32, ge=4, description="Channels of the critic (≈41 k parameters at 32 on the digits).")
    critic_norm: Literal["none", "layer"] = Field("none", description="LayerNorm after each hidden Linear of the "
                                                  "critic's MLP parts (layer), or none.")
    critic_t_samples: Int = Field(1, ge=1, le=64, description="States per sample the critic trains on each step: "
                                  "the actor's interpolant plus fresh (t, ε) draws, or recorded states (critic_states).")
    critic_states: Literal["interpolant", "rollout"] = Field(
        "interpolant", description="The critic trains on interpolants x_t = (1 − t)x0 + tε, or on the rollout's "
        "recorded states (needs rollout.keep_states: true); rollout also values the actor's baseline there.")
    centre_weights: bool = Field(True, description="[ours] Subtract the batch mean from the critic weights (w − 1): "
                                 "flat weights then give no gradient, so the actor does not drift towards its own "
                                 "samples where the critic sees no difference (docs/compose.md); needs alpha ≥ 1 so "
                                 "every sample's loss (w − 1)·FM + α·W2 stays convex (at alpha = 1 a row whose weight is near 0 is only "
                                 "linear in v_θ; with sharp weights, a large tau, raise alpha: docs/algorithms.md). "
                                 "false: the paper's weights w.")
    anchor: Literal["reference", "rollout"] = Field(
        "rollout", description="The policy the W2 term α‖v_θ − v‖² holds the actor to: [ours] the rollout policy "
        "π_old (a moving trust region, as AdvantageFlow's γ term; AC-Flow presets learner.rollout_update: ema, "
        "since with a copy and one update a batch π_old is π_θ at the step), or the frozen reference (the "
        "paper's Wasserstein regularisation: a fixed tilt of π_ref; with centre_weights: false, alpha 0.5, "
        "warmup_actor: frozen and learner.rollout_update: copy the bench's ac_flow_tilt, AC-Flow as the paper "
        "states it).")
    implicit_step: Float = Field(
        1.0, gt=0, le=1, description="[ours] β of DiffusionNFT's implicit parametrisation: the actor loss is "
        "applied to v⁺ = v_anchor + β·(v_θ − v_anchor) instead of v_θ, so each batch's optimum moves π_θ 1/β "
        "times as far from the anchor in the same direction (1: the loss on v_θ, as the paper).")
    times: Literal["uniform", "grid"] = Field(
        "grid", description="The actor's training times: [ours] DiffusionNFT's (grid): int(K·timestep_fraction) "
        "distinct times of each rollout's grid, fresh noise each, a loss row per (sample, time) with its own critic "
        "value and weight, the critic trained on those states (and its own draws: critic_t_samples, "
        "critic_states); or one t ~ U(0, 1) per sample (uniform: flow matching's, the paper's). grid by default: "
        "on the compose bench it lifts the reward at the same rollouts and diversity (docs/algorithms.md), for "
        "M times the learner's compute.")
    timestep_fraction: Float = Field(0.99, gt=0, le=1, description="times grid: the fraction of the K grid times "
                                     "each sample trains on (0.99 of 10 steps: 9).")
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)

    @model_validator(mode="after")
    def _centred_convex(self) -> ACFlowConfig:
        if self.centre_weights and self.alpha < 1:
            raise ValueError(f"centre_weights needs alpha >= 1 (got {self.alpha}): a sample's loss (w − 1)·FM + "
                             "α·W2 is convex only while w − 1 + α > 0, and w − 1 reaches −1")
        return self


class AdvantageFlowConfig(_Strict):
    gamma: Float = Field(1.1, ge=0, description="γ: weight of the rollout-policy term ‖f_θ − f_old‖².")
    lam: Float = Field(1e-3, ge=0, description="λ: weight of the reference term ‖f_θ − f_ref‖².")
    advantage_clip: Float = Field(1.0, gt=0, description="A_max: advantages clipped to ±A_max.")
    adaptive_norm: bool = Field(False, description="Divide each loss by sg(max(mean|f_θ − x0|, 1e-5)) as DiffusionNFT does.")
    tracker: TrackerConfig = Field(default_factory=lambda: TrackerConfig(global_std=True))

    @model_validator(mode="after")
    def _convex(self) -> AdvantageFlowConfig:
        from learner.objectives.advantage_flow import check_convexity

        check_convexity(self.gamma, self.lam, self.advantage_clip)
        return self


class DiffusionNFTConfig(_Strict):
    beta: Float = Field(1.0, gt=0, description="β: step of the implicit positive/negative policies.")
    advantage_clip: Float = Field(5.0, gt=0, description="A_max of r = clip(A/A_max/2 + 0.5, 0, 1).")
    ref_weight: Float = Field(1e-4, ge=0, description="Weight of the ‖v_θ − v_ref‖² term (released: 1e-4, always on).")
    loss: Literal["released", "velocity"] = Field("released", description="released: the branches in x0 space, each "
                                                  "divided by its stop-gradient mean |x0̂ − x0|, scaled by A_max/β; "
                                                  "velocity: r·‖v⁺ − u‖² + (1 − r)·‖v⁻ − u‖².")
    times: Literal["grid", "uniform"] = Field("grid", description="Training times: grid: int(K·timestep_fraction) "
                                              "distinct times of each rollout's grid, fresh noise each (released); "
                                              "uniform: one t ~ U(0, 1) per sample.")
    timestep_fraction: Float = Field(0.99, gt=0, le=1, description="times grid: the fraction of the K grid times "
                                     "each sample trains on (released 0.99: 9 of 10; at least one).")
    tracker: TrackerConfig = Field(default_factory=lambda: TrackerConfig(global_std=True, mode="batch"))


class FlowGRPOConfig(_Strict):
    clip_eps: Float = Field(1e-4, gt=0, description="ε of the clipped ratio (Flow-GRPO: 1e-4).")
    kl_beta: Float = Field(0.04, ge=0, description="β of the KL to the reference (Flow-GRPO: 0.04 GenEval/OCR, 0.01 PickScore).")
    advantage_clip: Float = Field(5.0, gt=0, description="Advantages clipped to ±A_max.")
    kl_std: Literal["noise_level", "step"] = Field("noise_level", description="The KL's divisor 2·std²: std the "
                                                   "noise level σ_t = a·sqrt(t/(1 − t)) as released (noise_level), "
                                                   "or the step's std σ_t·sqrt(|Δt|), the exact per-step KL (step).")
    timestep_fraction: Float = Field(0.99, gt=0, le=1, description="Train the first int(K·fraction) steps of each "
                                     "trajectory (released 0.99: with 10 steps the last is not trained).")
    filter_zero_advantage: bool = Field(True, description="Drop samples whose advantage is exactly 0 (zero-spread "
                                        "groups) from the loss, as released; one is kept if all are 0.")
    detach_uncond: bool = Field(True, description="With CFG rollouts (policy.cfg_scale > 1): no gradient through "
                                "the unconditional branch of the learner's recomputation (train_sd3.py).")
    minibatches: Int = Field(1, ge=1, description="Optimiser steps per pass over a batch, each on 1/n of its "
                             "(shuffled, filtered) samples; the release takes 2 (gradient accumulation = "
                             "num_batches_per_epoch / 2). learner.updates_per_batch repeats whole passes.")
    tracker: TrackerConfig = Field(default_factory=lambda: TrackerConfig(global_std=True, mode="batch"))


class AWMConfig(_Strict):
    beta: Float = Field(0.003, ge=0, description="Weight of the KL to the reference, mean ‖v_θ − v_ref‖² "
                        "(released: 0.003 PickScore, 0.001 GenEval/OCR).")
    ema_beta: Float = Field(1.0, ge=0, description="Weight of the KL to the rollout policy π_old, mean ‖v_θ − v_old‖² "
                            "(released: 1, to an EMA of the learner).")
    weighting: Literal["uniform", "t", "t2", "huber", "ghuber"] = Field(
        "ghuber", description="Time weighting of the matching log-likelihood (released: ghuber).")
    ghuber_power: Float = Field(0.25, gt=0, le=1, description="p of the generalised Huber weighting (released: 0.25).")
    clip_range: Float = Field(1.0, gt=0, description="PPO clip of the ratio exp(log p_θ − log p_old) (released: 1).")
    advantage_clip: Float = Field(5.0, gt=0, description="Advantages clipped to ±advantage_clip, then scaled "
                                  "by advantage_max/advantage_clip (released: 5).")
    advantage_max: Float = Field(1.0, gt=0, description="The clipped advantages' range after scaling, ±advantage_max "
                                 "(released: 1).")
    t_samples: Int = Field(6, ge=1, le=64, description="Times t (fresh ε each) per sample and step (released: 6).")
    tracker: TrackerConfig = Field(default_factory=lambda: TrackerConfig(global_std=True, mode="batch"))


class AlgorithmConfig(_Strict):
    name: ObjectiveName = Field("ac_flow", description="The objective (docs/algorithms.md); its section below applies.")
    orw: ORWConfig = Field(default_factory=ORWConfig)
    ac_flow: ACFlowConfig = Field(default_factory=ACFlowConfig)
    advantage_flow: AdvantageFlowConfig = Field(default_factory=AdvantageFlowConfig)
    diffusion_nft: DiffusionNFTConfig = Field(default_factory=DiffusionNFTConfig)
    flow_grpo: FlowGRPOConfig = Field(default_factory=FlowGRPOConfig)
    awm: AWMConfig = Field(default_factory=AWMConfig)


class LearnerConfig(_Strict):
    lr: Float = Field(2e-4, gt=0, le=1.0, description="AdamW learning rate.")
    weight_decay: Float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: Float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    warmup_steps: Int = Field(10, ge=0, description="Linear learning-rate warm-up, in optimiser steps.")
    micro_batch_size: Int = Field(80, ge=1, description="Rows per forward/backward; gradients accumulate over the batch.")
    updates_per_batch: Int = Field(1, ge=1, description="Optimiser steps on each rollout batch.")
    rollout_refresh_every: Int = Field(1, ge=1, description="H: a new published version of π_old every H steps.")
    rollout_update: Literal["copy", "ema"] = Field("copy", description="π_old ← π_θ at each refresh, or an EMA of π_θ "
                                                   "(rollout_ema_every, rollout_ema_schedule); AC-Flow presets ema.")
    rollout_ema_decay: Float = Field(0.9, ge=0, lt=1, description="EMA decay of π_old when rollout_update is 'ema' "
                                     "and rollout_ema_schedule is 'constant'.")
    rollout_ema_schedule: Literal["constant", "nft_decay0", "nft_decay1", "nft_decay2"] = Field(
        "constant", description="The EMA's decay d (π_old ← d·π_old + (1 − d)·π_θ) at optimiser step n: constant: "
        "rollout_ema_decay; DiffusionNFT's decay_type 0/1/2: d = 0, min(0.001·n, 0.5), "
        "0 before n = 75 then min(0.0075·(n − 75), 0.999).")
    rollout_ema_every: Literal["step", "refresh"] = Field("step", description="Apply the EMA after every optimiser "
                                                          "step, or once per refresh (DiffusionNFT: once per epoch).")
    sharding: Literal["ddp", "fsdp"] = Field("ddp", description="How resources.num_learners > 1 learners hold "
                                             "the policy; either way each rank trains on its share of every batch's "
                                             "rows. ddp: replicated on every rank, gradients averaged by torch's "
                                             "DistributedDataParallel; fsdp: sharded over the ranks by FSDP2 "
                                             "(fully_shard per transformer block: weights, gradients and AdamW state "
                                             "1/N per rank), for full fine-tunes larger than one GPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute the transformer's block activations in "
                                         "the backward pass (diffusers' own switch): less memory, ~30 % more "
                                         "compute per learner step.")


RewardKind = Literal["digits_classifier", "compose", "clip", "pickscore", "aesthetic", "jpeg_compressibility",
                     "jpeg_incompressibility", "target_image", "python"]


class RedisRewardConfig(_Strict):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (redis:// or rediss:// for TLS). "
                     "Credentials belong in the FMRL_REDIS_URL environment variable, which wins when set, "
                     "so they never land in a run's config.yaml.")
    stream: str | None = Field(None, description="Request stream; default fmrl:reward:<kind>:requests, the one "
                               "`fmrl reward-worker --reward <kind>` reads.")
    timeout_s: Float = Field(60.0, gt=0, le=WEEK_S, description="Wait for a request's result this long before resubmitting it.")
    attempts: Int = Field(3, ge=1, description="Submissions of a request before the reward counts as unavailable.")
    retry_unavailable_s: Float = Field(300.0, ge=0, le=WEEK_S, description="After an optional reward was unavailable, batches "
                                       "go without it this long before it is tried again.")
    max_in_flight: Int = Field(8, ge=1, description="Requests awaiting results at once.")
    max_images_per_request: Int = Field(64, ge=1, description="A batch is split into requests of at most this many images.")
    encoding: Literal["png", "raw"] = Field("raw", description="Image encoding on the wire, both lossless: raw "
                                            "bytes (no encode cost) or PNG (smaller, for slow links; at 512 px "
                                            "its encoding costs more than it saves, docs/performance.md).")


class RewardComponentConfig(_Strict):
    kind: RewardKind = Field(description="The reward model (reward_workers/registry.py).")
    name: str | None = Field(None, description="Label in metrics and reports; default: the kind. Unique per run.")
    weight: Float = Field(1.0, description="Weight of this component in the training reward Σ wᵢ·rᵢ "
                          "(negative only with reward.allow_negative_weights).")
    model_path: str | None = Field(None, description="Model directory or file (default: the kind's shipped model).")
    transport: Literal["ray", "redis"] = Field("ray", description="Scored in the cluster's reward actor, or by "
                                               "`fmrl reward-worker` services over Redis Streams.")
    required: bool = Field(True, description="A required reward that stays unavailable stops the run; an optional "
                           "one is left out of that batch's sum (counted).")
    redis: RedisRewardConfig = Field(default_factory=RedisRewardConfig, description="Used when transport is redis.")
    callable: str | None = Field(None, max_length=120, description="kind python only: the reward, "
                                 "'package.module:function' (or a class, built once per reward actor "
                                 "with init_kwargs) called as f(images, prompts, metadata) (docs/rewards.md).")
    init_kwargs: dict[str, Any] = Field(default_factory=dict, description="kind python, transport ray only: "
                                        "keyword arguments (JSON) of the callable's class; a service takes "
                                        "them as `fmrl reward-worker --init-kwargs`.")

    @property
    def label(self) -> str:
        return self.name or self.kind

    @field_validator("init_kwargs")
    @classmethod
    def _json_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:  # what a service receives as --init-kwargs JSON: finite numbers, no objects
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"must be JSON values with finite numbers ({e})") from None
        return v

    @model_validator(mode="after")
    def _python_callable(self) -> RewardComponentConfig:
        """A python reward's callable is imported and its signature checked here, so a bad one
        is refused before any actor starts; a service's lives where the service runs."""
        if self.kind != "python":
            if self.callable is not None or self.init_kwargs:
                raise ValueError(f"reward {self.label!r}: callable and init_kwargs belong to kind python only")
            return self
        if self.callable is None:
            raise ValueError(f"reward {self.label!r}: kind python needs callable: 'package.module:function'")
        if self.model_path is not None:
            raise ValueError(f"reward {self.label!r}: kind python takes no model_path (pass it in init_kwargs)")
        from reward_workers.custom import CALLABLE_PATTERN, check_callable

        if self.transport == "redis":
            if self.init_kwargs:
                raise ValueError(f"reward {self.label!r}: init_kwargs of a redis reward are the service's "
                                 "(`fmrl reward-worker --init-kwargs`), not the run's")
            if not re.fullmatch(CALLABLE_PATTERN, self.callable):
                raise ValueError(f"reward {self.label!r}: callable {self.callable!r} is not of the form "
                                 "'package.module:function'")
            return self
        try:
            check_callable(self.callable, self.init_kwargs)
        except ValueError as e:
            raise ValueError(f"reward {self.label!r}: {e}") from None
        return self


class RewardConfig(_Strict):
    components: list[RewardComponentConfig] = Field(
        default_factory=lambda: [RewardComponentConfig(kind="digits_classifier")],
        description="The rewards summed into the training reward, each in-cluster or a Redis service.")
    allow_negative_weights: bool = Field(False, description="Allow a component a negative weight (a penalty: "
                                         "training then lowers that score); refused unless set, since a lost "
                                         "minus sign would silently train against the reward.")

    @model_validator(mode="after")
    def _components(self) -> RewardConfig:
        if not self.components:
            raise ValueError("reward.components is empty: name at least one reward")
        labels = [c.label for c in self.components]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"reward components need distinct names; repeated: {', '.join(dup)} (set name:)")
        negative = [(i, c) for i, c in enumerate(self.components) if c.weight < 0]
        if negative and not self.allow_negative_weights:
            i, c = negative[0]
            raise ValueError(f"reward.components.{i}.weight={c.weight} is negative: set "
                             "reward.allow_negative_weights: true if a penalty is meant")
        if not any(c.required for c in self.components):
            raise ValueError("every reward component is optional: at least one must be required")
        return self

    def uses(self, kind: str) -> bool:
        return any(c.kind == kind for c in self.components)


class PipelineConfig(_Strict):
    max_policy_lag: Int = Field(0, ge=0, description="Published versions a batch may lag the learner by: 0 is "
                                "synchronous; k ≥ 1 rolls out the next k batches while the learner updates. "
                                "Rollouts beyond the bound are dropped (counted) and redone with current weights.")
    weight_sync: Literal["object_store", "torch_distributed"] = Field(
        "object_store", description="How published weights reach samplers: one zero-copy object in Ray's "
        "object store, or a torch.distributed broadcast from the learner (gloo on CPU, NCCL on GPUs).")
    sync_timeout_s: Float = Field(300.0, gt=0, le=WEEK_S, description="A torch.distributed broadcast (or group set-up) that "
                                  "waits longer than this for a peer fails the run instead of stalling it.")
    dist_backend: Literal["gloo", "nccl"] = Field("gloo", description="Backend of the torch.distributed "
                                                  "broadcast: gloo (CPU buffers) or NCCL (GPU to GPU; needs "
                                                  "learner_gpus and sampler_gpus).")


class ResourcesConfig(_Strict):
    num_samplers: Int = Field(2, ge=1, description="Sampler actors.")
    sampler_cpus: Float = Field(0.5, gt=0, description="CPUs declared by each sampler actor.")
    sampler_gpus: Float = Field(0.0, ge=0, description="GPUs declared by each sampler (inference GPUs on a cluster).")
    num_learners: Int = Field(1, ge=1, description="Learner actors: N > 1 form one data-parallel group "
                              "(torch.distributed: NCCL when they have GPUs, else gloo) that trains exactly as one "
                              "learner does, each rank on its share of every batch (learner.sharding).")
    learner_cpus: Float = Field(0.5, gt=0, description="CPUs declared by each learner actor.")
    learner_gpus: Float = Field(0.0, ge=0, description="GPUs declared by each learner actor (training GPUs on a "
                                "cluster); a learner group on GPUs needs one whole GPU per learner.")
    reward_cpus: Float = Field(0.25, gt=0, description="CPUs declared by each reward actor.")
    reward_gpus: Float = Field(0.0, ge=0, description="GPUs declared by each reward actor.")
    ray_num_cpus: Int | None = Field(None, ge=1, description="CPUs of an embedded Ray cluster (default: all).")
    torch_threads: Int = Field(1, ge=1, description="torch intra-op threads per actor.")
    sampler_resources: dict[str, Float] = Field(default_factory=dict, description="Custom Ray resources each "
                                                "sampler also needs, e.g. {inference_gpu: 1} to bind samplers to "
                                                "the nodes that advertise it (deploy/ray-cluster.yaml).")
    learner_resources: dict[str, Float] = Field(default_factory=dict, description="Custom Ray resources of the "
                                                "learner, e.g. {training_gpu: 1}.")
    reward_resources: dict[str, Float] = Field(default_factory=dict, description="Custom Ray resources of each "
                                               "in-cluster reward actor.")
    placement: Literal["pack", "spread", "none"] = Field(
        "pack", description="One placement group reserves every actor's bundle before any starts (PACK: as few "
        "nodes as fit; SPREAD: across nodes); 'none' places actors one by one.")
    placement_timeout_s: Float = Field(300.0, gt=0, le=WEEK_S, description="Fail, naming the bundles, when the cluster cannot "
                                       "place them within this long (an autoscaler may need minutes), at the start "
                                       "or after a node was lost with some of them (its actors wait for a node "
                                       "with their resources).")
    max_restarts: Int = Field(3, ge=0, description="Restarts of a sampler or reward actor that dies; a restarted "
                              "sampler is resynced and its lost rollout redone. The learner never restarts: "
                              "the run stops with its last checkpoint (resume with --resume).")

    def declared(self, per: Literal["cpus", "gpus"]) -> float:
        """The CPUs or GPUs every actor of a run declares together (learners, samplers, reward)."""
        return (self.num_learners * getattr(self, f"learner_{per}") + self.num_samplers * getattr(self, f"sampler_{per}")
                + getattr(self, f"reward_{per}"))

    @field_validator("sampler_resources", "learner_resources", "reward_resources")
    @classmethod
    def _custom(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if k in ("CPU", "GPU", "memory") or not x > 0]
        if bad:
            raise ValueError(f"{bad}: custom resources need positive amounts, and CPU/GPU have their own keys")
        return v


class MetricsConfig(_Strict):
    port: Int | None = Field(0, ge=0, le=65535, description="Serve the run's Prometheus metrics on this port "
                             "(0: a free port, printed at start and named in <out_dir>/prometheus/<run>.json for "
                             "Prometheus; a taken fixed port is an error; null: none). Names: docs/metrics.md.")
    host: str = Field("127.0.0.1", description="Address the metrics server binds to (0.0.0.0 exposes it "
                      "to the network: only behind a firewall or proxy).")
    final_scrape_timeout_s: Float = Field(30.0, ge=0, le=WEEK_S, description="When the run ends and something has been "
                                          "scraping its metrics, wait up to this long for one more scrape, so "
                                          "Prometheus has the final figures (the 'after' evaluation); 0: never wait.")


class EvalConfig(_Strict):
    samples_per_prompt: Int = Field(32, ge=2, le=MAX_SAMPLES_PER_PROMPT,
                                    description="Evaluation samples per prompt (before and after).")
    seed: Int = Field(12345, ge=0, le=SEED_MAX, description="Seed of the fixed evaluation noise.")
    grid_columns: Int = Field(8, ge=1, le=32, description="Samples per prompt shown in the before/after grid.")
    dataset: DatasetConfig | None = Field(None, description="Evaluation prompts from a dataset (every row, in "
                                          "file order); default: the distinct training prompts.")
    split_from_train: Float | None = Field(None, gt=0, lt=1, description="Hold out this fraction of "
                                           "rollout.dataset's rows (chosen by rollout.dataset.seed) as the "
                                           "evaluation prompts; training never sees them.")
    every: Int = Field(0, ge=0, description="Also evaluate after every this many iterations (between batches, "
                       "on the samplers' policy version; metrics.jsonl rows of kind eval, when 'iteration'); "
                       "0: only before and after training.")
    rewards: list[RewardComponentConfig] | None = Field(
        None, description="The rewards every evaluation reports (each component's mean; weights unused), "
        "including ones the run does not train on (an unseen reward); default: reward.components.")
    watch_factor: Float = Field(1.5, gt=1, description="Reward-hacking watch: an evaluation's image statistic or "
                                "diversity this factor or more above or below the base policy's is a drift "
                                "(exported as fmrl_eval_watch_factor; the FmrlRewardHacking alert compares).")

    @model_validator(mode="after")
    def _eval_rewards(self) -> EvalConfig:
        if self.rewards is not None:
            if not self.rewards:
                raise ValueError("eval.rewards is empty: leave it out to report the training rewards")
            labels = [c.label for c in self.rewards]
            dup = sorted({x for x in labels if labels.count(x) > 1})
            if dup:
                raise ValueError(f"eval.rewards need distinct names; repeated: {', '.join(dup)} (set name:)")
        return self

    @model_validator(mode="after")
    def _one_eval_source(self) -> EvalConfig:
        if self.dataset is not None and self.split_from_train is not None:
            raise ValueError("give eval.dataset or eval.split_from_train, not both")
        return self


PRESETS: dict[str, dict[str, tuple[Any, str]]] = {
    "ac_flow": {
        "learner.rollout_update": ("ema", "π_old, the rollout policy and the W2 term's anchor (algorithm.ac_flow."
                                          "anchor: rollout), trails π_θ as an EMA (learner.rollout_ema_decay): "
                                          "a moving trust region; a copy is π_θ itself at each step"),
    },
    "flow_grpo": {
        "policy.sampler": ("sde", "its clipped ratio and KL are per-step Gaussian log-probs, which only the "
                                  "SDE sampler records (the ODE is deterministic: no log-prob)"),
        "rollout.keep_states": (True, "every recorded step x_t → x_s is a row of the loss"),
    },
}
"""Per-algorithm presets: choosing ``algorithm.name`` sets these keys (value, why), each unless
the config file, an override or the Python caller gave it; the default algorithm's apply
when none is named. A value given that conflicts is not replaced: validation refuses it,
naming the key. The other algorithms train on the default ODE rollouts with π_old a copy
(their configs state their own rollout policy)."""


def _given(data: Any, keys: list[str]) -> tuple[bool, Any]:
    """(True, value) where the raw input ``data`` (dicts, or models whose set fields count)
    gives the dotted ``keys``; (False, None) where it leaves them to the defaults."""
    for k in keys:
        if isinstance(data, dict) and k in data:
            data = data[k]
        elif isinstance(data, BaseModel) and k in data.model_fields_set:
            data = getattr(data, k)
        else:
            return False, None
    return True, data


def _with(data: dict[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``keys`` set to ``value`` (the caller's objects are left as they
    are); ``data`` itself where a section on the way is not one (validation names it)."""
    head = data.get(keys[0], {})
    if len(keys) > 1:
        if isinstance(head, BaseModel):
            head = head.model_dump(exclude_unset=True)
        if not isinstance(head, dict):
            return data
        value = _with(head, keys[1:], value)
    return {**data, keys[0]: value}


class TrainConfig(_Strict):
    """The whole job."""

    run: RunConfig = Field(default_factory=RunConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _presets(cls, data: Any) -> Any:
        # the raw input is what the user set (file + overrides, or the Python caller's arguments)
        if not isinstance(data, dict):
            return data
        given, name = _given(data, ["algorithm", "name"])
        if not given:
            name = AlgorithmConfig.model_fields["name"].default
        for key, (value, _) in PRESETS.get(name if isinstance(name, str) else "", {}).items():
            if not _given(data, key.split("."))[0]:
                data = _with(data, key.split("."), value)
        return data

    @model_validator(mode="after")
    def _sampler_fits(self) -> TrainConfig:
        if self.algorithm.name == "flow_grpo":
            if self.policy.sampler not in ("sde", "sde_cps"):
                raise ValueError("algorithm flow_grpo needs policy.sampler: sde (or sde_cps; it trains on per-step "
                                 "log-probs)")
            if not self.rollout.keep_states:
                raise ValueError("algorithm flow_grpo needs rollouts that keep their states (rollout.keep_states: true)")
        return self

    @model_validator(mode="after")
    def _anchor_moves(self) -> TrainConfig:
        ln = self.learner
        if self.algorithm.name == "ac_flow" and self.algorithm.ac_flow.anchor == "rollout" \
                and ln.rollout_update == "copy" and ln.updates_per_batch == 1 and ln.rollout_refresh_every == 1:
            raise ValueError("algorithm.ac_flow.anchor rollout with learner.rollout_update copy and one update "
                             "a batch has no W2 term (π_old is π_θ); use rollout_update: ema or anchor: reference")
        return self

    @model_validator(mode="after")
    def _critic_states_kept(self) -> TrainConfig:
        if self.algorithm.name == "ac_flow" and self.algorithm.ac_flow.critic_states == "rollout" \
                and not self.rollout.keep_states:
            raise ValueError("algorithm.ac_flow.critic_states rollout trains the critic on recorded states: "
                             "set rollout.keep_states: true (or critic_states: interpolant)")
        return self

    @model_validator(mode="after")
    def _policy_source(self) -> TrainConfig:
        p = self.policy
        if p.kind == "sd3":
            if not p.pretrained:
                raise ValueError("policy.kind sd3 needs policy.pretrained: a StableDiffusion3Pipeline directory "
                                 "(or hub id); `fmrl make-tiny-sd3 --out DIR` writes a tiny random one")
            if p.checkpoint is not None:
                raise ValueError("policy.checkpoint is the digits policy file; an sd3 policy comes from policy.pretrained")
            if self.reward.uses("digits_classifier"):
                raise ValueError("the digits_classifier reward scores 8×8 digits; choose rewards for SD3 images "
                                 "(reward.components)")
        elif p.pretrained is not None:
            raise ValueError("policy.pretrained applies to kind sd3; the digits policy comes from policy.checkpoint")
        return self

    @model_validator(mode="after")
    def _learner_group(self) -> TrainConfig:
        n = self.resources.num_learners
        if n == 1:
            if self.learner.sharding == "fsdp":
                raise ValueError("learner.sharding fsdp shards the policy over a learner group: set "
                                 "resources.num_learners to 2 or more (one learner holds it whole)")
            return self
        rollouts = self.rollout.batch_prompts * self.rollout.samples_per_prompt
        if n > rollouts:
            raise ValueError(f"resources.num_learners={n} exceeds the {rollouts} rollouts of a batch "
                             "(rollout.batch_prompts × rollout.samples_per_prompt): a learner would have none")
        if self.algorithm.name == "orw_cfm_w2" and self.algorithm.orw.coupling == "minibatch_ot":
            raise ValueError("algorithm.orw.coupling minibatch_ot pairs noise across the whole batch; it runs with "
                             "resources.num_learners: 1 (or use coupling: independent)")
        if 0 < self.resources.learner_gpus < 1:
            raise ValueError(f"resources.learner_gpus={self.resources.learner_gpus:g}: a learner group "
                             f"(resources.num_learners={n}) runs NCCL, which needs one whole GPU per learner")
        return self

    @model_validator(mode="after")
    def _nccl_on_gpus(self) -> TrainConfig:
        r = self.resources
        if self.pipeline.dist_backend == "nccl" and not (r.learner_gpus > 0 and r.sampler_gpus > 0):
            raise ValueError("pipeline.dist_backend nccl broadcasts between GPUs: set resources.learner_gpus "
                             "and resources.sampler_gpus, or use gloo")
        return self

    @model_validator(mode="after")
    def _split(self) -> TrainConfig:
        if self.reward.uses("digits_classifier"):
            from reward_workers.digits import prompt_digit

            if self.rollout.dataset is None:  # a dataset's prompts are checked when it is read
                for p in self.rollout.prompts:
                    prompt_digit(p)  # raises, naming the prompt, when it names no single digit
        if self.eval.split_from_train is not None and self.rollout.dataset is None:
            raise ValueError("eval.split_from_train splits rollout.dataset; give one (or eval.dataset)")
        if self.resources.num_samplers > self.rollout.batch_prompts:
            raise ValueError(f"resources.num_samplers={self.resources.num_samplers} exceeds the "
                             f"{self.rollout.batch_prompts} prompts of a rollout batch: a sampler would have no prompt")
        return self

    def learner_settings(self) -> LearnerSettings:
        a, ln = self.algorithm, self.learner

        def tracked(cls: type, section: BaseModel) -> Any:
            d = section.model_dump()
            if "tracker" in d:
                d["tracker"] = TrackerParams(**d["tracker"])
            return cls(**d)

        return LearnerSettings(
            objective=a.name, orw=tracked(ORWParams, a.orw), ac_flow=tracked(ACFlowParams, a.ac_flow),
            advantage_flow=tracked(AdvantageFlowParams, a.advantage_flow),
            diffusion_nft=tracked(DiffusionNFTParams, a.diffusion_nft), awm=tracked(AWMParams, a.awm),
            flow_grpo=FlowGRPOParams(sde_a=self.policy.sde_a, clip_eps=a.flow_grpo.clip_eps, kl_beta=a.flow_grpo.kl_beta,
                                     advantage_clip=a.flow_grpo.advantage_clip,
                                     step_kind="cps" if self.policy.sampler == "sde_cps" else "sde",
                                     kl_std=a.flow_grpo.kl_std, timestep_fraction=a.flow_grpo.timestep_fraction,
                                     filter_zero_advantage=a.flow_grpo.filter_zero_advantage,
                                     cfg_scale=self.policy.cfg_scale, detach_uncond=a.flow_grpo.detach_uncond,
                                     minibatches=a.flow_grpo.minibatches,
                                     tracker=TrackerParams(**a.flow_grpo.tracker.model_dump())),
            lr=ln.lr, weight_decay=ln.weight_decay, grad_clip=ln.grad_clip,
            warmup_steps=ln.warmup_steps, micro_batch_size=ln.micro_batch_size,
            updates_per_batch=ln.updates_per_batch, rollout_refresh_every=ln.rollout_refresh_every,
            rollout_update=ln.rollout_update, rollout_ema_decay=ln.rollout_ema_decay,
            rollout_ema_schedule=ln.rollout_ema_schedule, rollout_ema_every=ln.rollout_ema_every, seed=self.run.seed,
        )


# ---- reading: bounded YAML, one-line errors ------------------------------------------------

MAX_ALIAS_NODES = 10_000
"""Nodes that YAML aliases may add to a document once expanded. A few anchors shared between
sections stay well under it; an alias bomb (1 KB → 10⁹ nodes) is refused before it expands."""
MAX_DEPTH = 32  # the config tree is 5 levels deep; deeper nesting is never a config
MAX_ECHO = 60  # characters of a bad value repeated in a message
MAX_REASON = 200  # characters of one error's reason
MAX_ERRORS = 5  # errors listed in one message (then "and N more")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last
    silently: an edit at the top of a section would be undone by a stale line below it), and
    reading an unquoted date as text: no key is a date, and `name: 2026-12-02` names a run."""

    yaml_implicit_resolvers = {
        first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_clip(repr(key), MAX_ECHO)} (first at line {first[key] + 1})",
                        key_node.start_mark)
                first[key] = key_node.start_mark.line
            except TypeError:  # unhashable: the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


def _check_size(root: yaml.Node) -> None:
    """Refuse a composed document whose aliases expand past MAX_ALIAS_NODES, refer to
    themselves, or that nests deeper than MAX_DEPTH — counted on the node graph, where an
    alias is one shared node, before anything is expanded."""
    def children(n: yaml.Node) -> list[yaml.Node]:
        if isinstance(n, yaml.SequenceNode):
            return list(n.value)
        if isinstance(n, yaml.MappingNode):
            return [x for pair in n.value for x in pair]
        return []

    unique: set[int] = set()
    todo = [root]
    while todo:
        n = todo.pop()
        if id(n) not in unique:
            unique.add(id(n))
            todo += children(n)
    limit = len(unique) + MAX_ALIAS_NODES
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels at line {n.start_mark.line + 1}")
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in open_nodes:
            raise yaml.YAMLError(f"an alias at line {n.start_mark.line + 1} refers to a node that contains it")
        open_nodes.add(id(n))
        total = 1
        for c in children(n):
            total += size(c, depth + 1)
            if total > limit:
                raise yaml.YAMLError(f"aliases expand the document past {MAX_ALIAS_NODES} extra nodes "
                                     f"(at line {c.start_mark.line + 1}): write the values out, not by alias")
        open_nodes.discard(id(n))
        sizes[id(n)] = total
        return total

    size(root, 0)


def _unshared(x: Any) -> Any:
    """A copy in which aliased values are separate objects, so an override of one place
    does not change the other places that alias it."""
    if isinstance(x, dict):
        return {k: _unshared(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_unshared(v) for v in x]
    return x


def _yaml_message(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what, and where (its own message spans several)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        what = "; ".join(x for x in (exc.context, exc.problem) if x) or "invalid YAML"
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return _clip(what, MAX_REASON) + where
    return _clip(" ".join(str(exc).split()), MAX_REASON)


def _load_yaml(text: str, source: str) -> Any:
    """``text`` as plain data (dicts, lists, scalars), refused with a one-line ConfigError
    naming ``source`` when it is not YAML, repeats a key, or is an alias bomb or too deep."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node)
        return _unshared(loader.construct_document(node))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: {_yaml_message(exc)}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: nested deeper than {MAX_DEPTH} levels") from None
    finally:
        loader.dispose()


def _read_text(p: Path) -> str:
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{p} is not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line}") from None


def _describe(err: ValidationError) -> str:
    """Pydantic's errors in one line of bounded length: the key, the reason, a clipped echo."""
    parts = []
    errors = err.errors()
    for e in errors[:MAX_ERRORS]:
        loc = _clip(".".join(str(x) for x in e["loc"]) or "config", 100)
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif e["type"] == "finite_number":
            parts.append(f"{loc}: must be finite")
        else:
            msg = _clip(" ".join(e["msg"].removeprefix("Value error, ").split()), MAX_REASON)
            echo = "input" in e and not isinstance(e["input"], (dict, list))
            parts.append(f"{loc}: {msg} (got {_clip(repr(e['input']), MAX_ECHO)})" if echo else f"{loc}: {msg}")
    if len(errors) > MAX_ERRORS:
        parts.append(f"and {len(errors) - MAX_ERRORS} more")
    return "; ".join(parts)


# ---- overrides: OmegaConf dotlists, read against the schema ----------------------------------

_INDEX = re.compile(r"\[(-?\d+)\]")
_NULLS = ("null", "Null", "NULL", "~")


def _override_keys(key: str) -> list[str]:
    """'reward.components[0].weight' or 'reward.components.0.weight' → its parts."""
    keys = _INDEX.sub(r".\1", key).split(".")
    if any(not k.strip() for k in keys):
        raise ConfigError(f"--set {_clip(key, 100)}: a key is names and list indexes joined by dots, "
                          "e.g. reward.components.0.weight")
    return keys


def _unwrap(annotation: Any) -> Any:
    """Annotated[X, ...] → X; X | None → X (a union of several types stays as it is)."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _schema_path(keys: list[str]) -> list[tuple[Any, Any]]:
    """(annotation, FieldInfo or None) of each prefix of ``keys`` in the TrainConfig schema, as
    far as the schema reaches (a list index reads the item type, a dict key the value type)."""
    out: list[tuple[Any, Any]] = []
    annotation: Any = TrainConfig
    for k in keys:
        node, field = _unwrap(annotation), None
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(k)
            if field is None:
                break
            annotation = field.annotation
        elif get_origin(node) is list and k.lstrip("-").isdigit():
            annotation = get_args(node)[0]
        elif get_origin(node) is dict:
            annotation = get_args(node)[1]
        else:
            break
        out.append((annotation, field))
    return out


def _is_text(annotation: Any) -> bool:
    """Whether the schema reads this annotation as text: str, a Path, or a union of them (and None)."""
    node = _unwrap(annotation)
    options = get_args(node) if get_origin(node) in (Union, types.UnionType) else (node,)
    return all(o is type(None) or o is str or (isinstance(o, type) and issubclass(o, PurePath))
               for o in (_unwrap(x) for x in options))


def _is_section(annotation: Any) -> bool:
    """Whether the schema has keys below this annotation: a section, a list or a mapping."""
    node = _unwrap(annotation)
    return (isinstance(node, type) and issubclass(node, BaseModel)) or get_origin(node) in (list, dict)


def _optional(annotation: Any) -> bool:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def parse_override(item: str) -> tuple[str, Any]:
    """'learner.lr=1e-4' → ('learner.lr', 0.0001): the value read as YAML (bounded, as a file
    is), except where the schema says text (str, a path): there the text is kept as typed
    (run.name=2026-12-02 or 1.0 stays a name), quotes removed, and null is None if allowed."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {_clip(repr(item), MAX_ECHO)}")
    key, text = key.strip(), raw.strip()
    source = f"--set {_clip(key, 100)}"
    if not text:
        return key, ""
    keys = _override_keys(key)
    path = _schema_path(keys)
    annotation = path[-1][0] if len(path) == len(keys) else None
    if annotation is None or not _is_text(annotation):
        return key, _load_yaml(raw, source)
    if text in _NULLS and _optional(annotation):
        return key, None
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # YAML's quoting and escapes
        try:
            value = _load_yaml(text, source)
        except ConfigError:
            value = None
        if isinstance(value, str):
            return key, value
    return key, text


class _Text:
    """A string handed to OmegaConf as an opaque object, so that text such as a prompt is never
    read as an interpolation (${...}) or as OmegaConf's missing value (???)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _opaque(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _opaque(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_opaque(v) for v in x]
    return _Text(x) if isinstance(x, str) else x


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x.text if isinstance(x, _Text) else x


def _schema_default(keys: list[str]) -> Any:
    """The schema's default of the list field at ``keys`` as plain data; None for any other."""
    path = _schema_path(keys)
    if len(path) != len(keys) or path[-1][1] is None:
        return None
    default = path[-1][1].get_default(call_default_factory=True)
    if isinstance(default, list):
        return [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default]
    return None


def _prepare_path(conf: Any, keys: list[str], key: str) -> None:
    """Walk ``conf`` (an OmegaConf tree) along ``keys`` before an update: a list the file left
    out but the path indexes is filled with the schema's default (reward.components.0.weight
    edits the default component); a null section becomes an empty one; passing through a
    value or past a list's end is refused."""
    from omegaconf import DictConfig, ListConfig

    where = f"--set {_clip(key, 100)}"
    schema = _schema_path(keys)
    node = conf
    for i, k in enumerate(keys[:-1]):
        if i < len(schema) and not _is_section(schema[i][0]):
            raise ConfigError(f"{where}: '{_clip(k, MAX_ECHO)}' is a value, not a section")
        if isinstance(node, ListConfig):
            if not k.lstrip("-").isdigit():
                raise ConfigError(f"{where}: '{_clip(keys[i - 1], MAX_ECHO)}' is a list; index it by "
                                  f"number ({'.'.join(keys[:i])}.0)")
            if not -len(node) <= int(k) < len(node):
                raise ConfigError(f"{where}: index {k} is past the end of '{_clip(keys[i - 1], MAX_ECHO)}' "
                                  f"({len(node)} item(s)); set the whole list to add one")
            k_ = int(k)
        elif isinstance(node, DictConfig):
            k_ = k
            if k not in node or node[k] is None:
                default = _schema_default(keys[:i + 1])
                node[k] = _opaque(default) if default is not None else {}
        else:
            return
        child = node[k_]  # never an interpolation: every string in the tree is a _Text
        if not isinstance(child, (DictConfig, ListConfig)):
            raise ConfigError(f"{where}: '{_clip(k, MAX_ECHO)}' is a value, not a section")
        node = child


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``tree`` (plain data, as read from YAML) with ``key=value`` overrides applied in order,
    through OmegaConf's dotlist updates: dotted keys, list indexes (reward.components.0.weight=2,
    or components[0]), a value replacing what was there."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        conf = OmegaConf.create(_opaque(tree), flags={"allow_objects": True})
    except OmegaConfBaseException as exc:  # e.g. a mapping key YAML allows and OmegaConf does not
        raise ConfigError(f"cannot apply overrides to this config: {_clip(str(exc).splitlines()[0], MAX_REASON)}") from None
    for item in overrides:
        key, value = parse_override(item)
        keys = _override_keys(key)
        _prepare_path(conf, keys, key)
        try:
            OmegaConf.update(conf, ".".join(keys), _opaque(value), merge=False)
        except (OmegaConfBaseException, TypeError, IndexError, KeyError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"--set {_clip(key, 100)}: {_clip(reason, MAX_REASON)}") from None
    return _plain(OmegaConf.to_container(conf, resolve=False))


def shipped_configs() -> dict[str, Path]:
    """The configs that ship with the package (the ``configs`` package's YAML files), by name."""
    from importlib.resources import files

    # a directory on disk wherever the project is installed (wheel, editable, checkout)
    folder = Path(str(files("configs")))
    return {f.stem: f for f in sorted(folder.glob("*.yaml"))}


def resolve_config(name_or_path: Path | str) -> Path:
    """The config file ``name_or_path`` means: an existing file as given, else a shipped
    config by name (``digits_ac_flow`` or ``digits_ac_flow.yaml``); ConfigError (one line,
    listing the shipped names) for anything else."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = shipped_configs()
    text = str(name_or_path)
    if "/" not in text and "\\" not in text and p.suffix in ("", ".yaml"):
        found = shipped.get(p.stem)
        if found is not None:
            return found
    raise ConfigError(f"config file not found: {_clip(text, 200)}, nor a shipped config of that name "
                      f"(shipped: {', '.join(shipped) or 'none'})")


RUN_DEFAULTS_BEFORE: dict[str, Any] = {
    "algorithm.ac_flow.centre_weights": False,
    "algorithm.ac_flow.anchor": "reference",
    "algorithm.ac_flow.times": "uniform",
}
"""Keys added to the tree after runs were written, whose defaults are not what those runs ran
with: a run's config.yaml (every key, as ``dump_config`` writes it) that lacks one predates it
and ran with the value here. ``load_config(..., run=True)`` fills them in, so such a run
evaluates and exports as it ran (a resume of it is refused by the learner, whose checkpoint
settings lack them)."""


def load_config(path: Path | str | None = None, overrides: list[str] | None = None, *, run: bool = False) -> TrainConfig:
    """Read a YAML config (a file, or a shipped config by name; else the defaults), apply
    ``key=value`` overrides, validate. ``run``: the file is a run's own config.yaml, and a key
    it predates takes the value it ran with (``RUN_DEFAULTS_BEFORE``), not today's default."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = resolve_config(path)
        loaded = _load_yaml(_read_text(p), str(p)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
        if run:
            for key, value in RUN_DEFAULTS_BEFORE.items():
                keys = key.split(".")
                if _given(tree, keys[:-1])[0] and not _given(tree, keys)[0]:
                    tree = _with(tree, keys, value)
    if overrides:
        tree = apply_overrides(tree, overrides)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def validate_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` checked as ``load_config`` checks a file: every check is a validator of the tree,
    and a config built or changed in Python may have skipped some (assignment validates only
    the field assigned, not the sections around it; ``model_construct`` and in-place edits of a
    list validate nothing). Re-validates a copy of it; raises ConfigError in one line."""
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"expected a TrainConfig (e.g. load_config's), got {type(cfg).__name__}")
    try:
        # a full dump gives every key, so no preset applies: a config is checked, never changed
        return TrainConfig.model_validate(cfg.model_dump(warnings=False))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _type_name(annotation: Any) -> str:
    node = annotation
    while get_origin(node) is Annotated:
        node = get_args(node)[0]
    origin, args = get_origin(node), get_args(node)
    if origin in (Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of the choices"
    if origin is list:
        item = _type_name(args[0])
        return f"list of {({'section': 'sections', 'one of the choices': 'choices'}).get(item, item)}"
    if origin is dict:
        return f"mapping of names to {_type_name(args[1])}"
    if isinstance(node, type) and issubclass(node, BaseModel):
        return "section"
    if isinstance(node, type) and issubclass(node, PurePath):
        return "path"
    return {int: "integer", float: "number", bool: "true or false", str: "text"}.get(node, str(node))


def _choices(annotation: Any) -> list[Any]:
    """The values of every Literal inside ``annotation``."""
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [c for a in get_args(annotation) for c in _choices(a)]


def _bounds(field: Any) -> str:
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{signs[name]} {getattr(m, name)}" for m in field.metadata
                     for name in signs if hasattr(m, name))


def _default_at(keys: list[str], field: Any) -> Any:
    """The default of ``keys`` in a default TrainConfig (a section's default may differ from its
    class's: the trackers of advantage_flow, diffusion_nft and flow_grpo use global_std); the
    field's own default where the default config has no such place (policy.lora is null)."""
    obj: Any = TrainConfig()
    for k in keys:
        if isinstance(obj, list) and not k.lstrip("-").isdigit():
            obj = obj[0] if obj else None  # reward.components.weight: the default first item's
        if isinstance(obj, BaseModel) and k in type(obj).model_fields:
            obj = getattr(obj, k)
        elif isinstance(obj, list) and k.lstrip("-").isdigit() and -len(obj) <= int(k) < len(obj):
            obj = obj[int(k)]
        else:
            return field.get_default(call_default_factory=True)
    return obj


def explain(key: str) -> str:
    """What ``fmrl config --explain KEY`` prints: the key's description, type, bounds, choices,
    default and any algorithm preset of it. List indexes may be given or left out
    (reward.components.0.weight or reward.components.weight)."""
    keys = _override_keys(key)
    annotation: Any = TrainConfig
    field: Any = None  # the FieldInfo when the key names a field (not a list item or mapping entry)
    for i, k in enumerate(keys):
        node, field = _unwrap(annotation), None
        while get_origin(node) is list and not k.lstrip("-").isdigit():
            node = _unwrap(get_args(node)[0])  # reward.components.weight: the items' key
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(k)
            if field is None:
                close = difflib.get_close_matches(k, list(node.model_fields), n=3)
                hint = f"; did you mean {' or '.join(close)}?" if close else f"; its keys: {', '.join(node.model_fields)}"
                raise ConfigError(f"unknown key '{_clip('.'.join(keys[:i + 1]), 100)}'{hint}")
            annotation = field.annotation
        elif get_origin(node) is list:
            annotation = get_args(node)[0]
        elif get_origin(node) is dict:
            annotation = get_args(node)[1]
        else:
            raise ConfigError(f"'{_clip('.'.join(keys[:i]), 100)}' is a value, not a section: it has no key {_clip(k, MAX_ECHO)!r}")
    lines = [key]
    node = _unwrap(annotation)
    section = isinstance(node, type) and issubclass(node, BaseModel)
    text = field.description if field is not None and field.description else (node.__doc__ if section else None)
    if text:
        lines.append(f"  {' '.join(text.split())}")
    type_line = f"  type:    {_type_name(annotation)}"
    if field is not None and _bounds(field):
        type_line += f", {_bounds(field)}"
    lines.append(type_line)
    if _choices(annotation):
        lines.append(f"  choices: {', '.join(str(c) for c in _choices(annotation))}")
    if section:
        lines.append(f"  keys:    {', '.join(node.model_fields)}")
    elif field is not None:
        default = _default_at(keys, field)
        if isinstance(default, list):
            default = [d.model_dump(mode="json", exclude_defaults=True) if isinstance(d, BaseModel) else d
                       for d in default]
        shown = yaml.safe_dump(default.as_posix() if isinstance(default, PurePath) else default,
                               default_flow_style=True, width=10**6, allow_unicode=True).strip()
        lines.append(f"  default: {_clip(shown.removesuffix('...').strip(), 300)}")
    dotted = ".".join(k for k in keys if not k.lstrip("-").isdigit())
    for algorithm, preset in PRESETS.items():
        if dotted in preset:
            value, why = preset[dotted]
            lines.append(f"  preset:  algorithm.name={algorithm} sets {value} unless given: {why}")
    return "\n".join(lines)


def field_value(section: type[BaseModel], name: str, text: str) -> Any:
    """``text`` validated as the field ``name`` of a config section, with that field's type,
    bounds and finiteness (the command line's numbers share the config's rules); raises
    ConfigError with the reason."""
    inst = section.model_construct()
    try:
        setattr(inst, name, text)
    except ValidationError as exc:
        raise ConfigError(_describe(exc).split(": ", 1)[-1]) from None
    return getattr(inst, name)


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written into every run directory)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
