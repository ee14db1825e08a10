"""Velocity models: the policy interface shared by samplers and the learner."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from samplers.flow import to_model_timestep
from samplers.text import PromptEmbeddings


class VelocityModel(Protocol):
    """v_θ(x_t, t, c): x_t (B, C, H, W), t (B,) in [0, 1] (1 = noise) → (B, C, H, W)."""

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbeddings) -> torch.Tensor: ...


class SD3Velocity(nn.Module):
    """Wraps a diffusers ``SD3Transformer2DModel`` in the project's convention.

    The transformer predicts u = ε − x0 given the 0–1000 timestep; this module takes
    t ∈ [0, 1] and prompt embeddings, so every caller speaks one convention.
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbeddings) -> torch.Tensor:
        # The transformer runs where its weights live, in their dtype; the velocity comes back
        # to the caller's device and dtype (differentiably), so a learner keeps its batch, its
        # statistics and its critic on the CPU while an SD3 policy runs on a GPU in bf16. The
        # timestep stays float32, as diffusers passes it (in bf16, 1000·t would round to steps of 4).
        device, dtype = self.transformer.device, self.transformer.dtype
        t = torch.as_tensor(t, dtype=torch.float32, device=device).expand(x_t.shape[0])
        v = self.transformer(
            hidden_states=x_t.to(device, dtype),
            encoder_hidden_states=cond.tokens.to(device, dtype),
            pooled_projections=cond.pooled.to(device, dtype),
            timestep=to_model_timestep(t),
            return_dict=False,
        )[0]
        return v.to(x_t.device, x_t.dtype)


def build_sd3_velocity(config: dict[str, Any]) -> SD3Velocity:
    """An ``SD3Velocity`` around a freshly initialised transformer of this config."""
    from diffusers import SD3Transformer2DModel

    return SD3Velocity(SD3Transformer2DModel(**config))


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (order independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():  # hashed in place: a bytes copy would cost 4× the hash itself
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_velocity(model: SD3Velocity, path: Path | str, metadata: dict[str, str] | None = None,
                  adapter_only: bool = False, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write the transformer's weights and config to one safetensors file (config in metadata);
    ``adapter_only``: only the LoRA adapter's tensors (the base stays where it came from);
    ``state``: the transformer's tensors to write instead of the model's own (e.g. gathered from
    the shards of an FSDP learner group)."""
    meta = {"transformer_config": json.dumps(dict(model.transformer.config)), **(metadata or {})}
    if is_adapted(model):
        meta["lora"] = json.dumps(lora_settings(model))
    # a rollout adapter (``RolloutAdapter``) is the learner's π_old, never part of the policy's file
    state = {k: v.detach().cpu().contiguous() for k, v in (model.transformer.state_dict() if state is None
                                                            else state).items()
             if is_adapter_key(k) or not (adapter_only or _is_lora_key(k))}
    if adapter_only:
        meta["adapter_only"] = "1"
    save_tensors(path, state, meta)


# ---- tensor files that carry their own digest ---------------------------------------------
# Every safetensors file fmrl writes (policies, checkpoints' rollout and optimizer files)
# records in its metadata a SHA-256 over its tensors and its other metadata, and every load
# verifies it: the digest travels with the file, so a file hard-linked into a run's
# checkpoint/ or copied anywhere on its own is covered as well as the checkpoint it came from.
DIGEST_KEY = "fmrl_sha256"


def tensors_digest(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 over a file's metadata (less the digest itself) and its tensors' names, dtypes,
    shapes and bytes (``state_checksum``)."""
    meta = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    h.update(state_checksum(state).encode())
    return h.hexdigest()


def save_tensors(path: Path | str, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``state`` and ``metadata`` (plus their digest) to ``path`` whole or not at all: into a
    fresh temporary file beside it, flushed to disk, then renamed over ``path`` (a link planted
    at either name is replaced, never written through)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**metadata, DIGEST_KEY: tensors_digest(state, metadata)}
    replace_atomically(path, lambda tmp: save_file(state, tmp, metadata=meta))


def replace_atomically(path: Path, write: Callable[[str], Any]) -> None:
    """``path`` gets what ``write(tmp)`` writes, whole, or keeps what it held: ``write`` fills a
    fresh temporary file beside it (never an existing name, so never through a planted link),
    which is flushed to disk and renamed over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are read by other processes
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _damaged(path: Path, exc: Exception) -> ValueError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ValueError(f"{path} is not a readable safetensors checkpoint (damaged or truncated?): {first}")


def tensor_file_metadata(path: Path | str) -> dict[str, str]:
    """The metadata of a safetensors file, reading its header only: a missing file, or one cut
    short (its header describes more bytes than it holds), fails here, naming it, without the
    cost of reading and hashing its tensors (``read_tensors`` does that)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise _damaged(path, exc) from None


def read_tensors(path: Path | str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, its digest verified. A damaged, truncated or
    altered file is a one-line ``ValueError`` naming it; a file written before fmrl recorded
    digests loads with a warning."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no mapping
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise _damaged(path, exc) from None
    want = meta.get(DIGEST_KEY)
    if want is None:
        warnings.warn(f"{path} records no SHA-256 digest (written before fmrl recorded them): loaded unverified",
                      stacklevel=2)
    elif tensors_digest(state, meta) != want:
        raise ValueError(f"{path} is corrupt: its SHA-256 digest differs from the one recorded when it was "
                         "written (damaged on disk or in transfer); refusing to load it")
    return meta, state


def _read_policy_file(path: Path | str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a file written by ``save_velocity``; clear errors for anything else."""
    meta, state = read_tensors(path)
    if "transformer_config" not in meta:
        raise ValueError(f"{path} has no transformer_config metadata; not an fmrl policy checkpoint")
    return meta, state


def _metadata_object(meta: dict[str, str], key: str, path: Path | str) -> dict[str, Any]:
    """A JSON object stored in a policy file's metadata, or an error naming the file and key."""
    try:
        value = json.loads(meta[key])
    except ValueError as exc:
        raise ValueError(f"{path}: its {key} metadata is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: its {key} metadata is not a JSON object (got {type(value).__name__})")
    return value


def load_velocity(path: Path | str) -> SD3Velocity:
    """Rebuild an ``SD3Velocity`` from a file written by ``save_velocity``."""
    meta, state = _read_policy_file(path)
    if meta.get("adapter_only") == "1":
        raise ValueError(f"{path} holds only a LoRA adapter; load it onto the policy it adapts "
                         "(the run's policy.checkpoint or policy.pretrained)")
    config = {k: v for k, v in _metadata_object(meta, "transformer_config", path).items() if not k.startswith("_")}
    try:
        model = build_sd3_velocity(config)
    except (TypeError, ValueError) as exc:  # an unknown option, a value of the wrong type
        raise ValueError(f"{path}: its transformer_config does not build a transformer: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}") from exc
    if "lora" in meta:
        add_lora(model, **_metadata_object(meta, "lora", path))
    missing, unexpected = model.transformer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


# ---- the layouts diffusers loads ----------------------------------------------------------
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
TRANSFORMER_DIR = "transformer"


def save_diffusers_layout(path: Path | str, directory: Path | str) -> Path:
    """The policy of a file ``save_velocity`` wrote (its digest verified), written into
    ``directory`` in the layout diffusers loads: an adapter as ``pytorch_lora_weights.safetensors``,
    as ``StableDiffusion3Pipeline.save_lora_weights`` writes it (keys ``transformer.…lora_A.weight``
    from peft's ``get_peft_model_state_dict``, the LoRA config in its metadata, so
    ``pipe.load_lora_weights(directory)`` restores rank and alpha), the way diffusers'
    train_dreambooth_lora_sd3.py saves; full weights as ``transformer/`` (``save_pretrained``).
    Returns the file or directory written.

    The transformer is built on the meta device and takes the file's tensors: nothing is
    initialised and an adapter's base is never read, so this costs one copy of the file's
    tensors whatever the model's size."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    meta, state = _read_policy_file(path)
    config = {k: v for k, v in _metadata_object(meta, "transformer_config", path).items() if not k.startswith("_")}
    adapter_only = meta.get("adapter_only") == "1"
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config)
        if adapter_only:
            lora = _metadata_object(meta, "lora", path)
            transformer.add_adapter(LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                                               target_modules=list(lora["target_modules"]), init_lora_weights=True),
                                    adapter_name=ADAPTER)
    missing, unexpected = transformer.load_state_dict(state, strict=False, assign=True)
    if adapter_only:
        missing = [k for k in missing if is_adapter_key(k)]
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out = Path(directory)
    if adapter_only:
        StableDiffusion3Pipeline.save_lora_weights(
            out, transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name=ADAPTER),
            transformer_lora_adapter_metadata=transformer.peft_config[ADAPTER].to_dict(),
            weight_name=LORA_WEIGHTS_FILE)
        return out / LORA_WEIGHTS_FILE
    transformer.save_pretrained(out / TRANSFORMER_DIR)
    return out / TRANSFORMER_DIR


def load_weights(model: SD3Velocity, path: Path | str) -> None:
    """Load a file written by ``save_velocity`` into ``model`` in place (no second model): a full
    policy's every tensor, or an adapter onto ``model``'s base (which must carry the same LoRA)."""
    meta, state = _read_policy_file(path)
    if meta.get("adapter_only") == "1":
        load_adapter(model, state, f"{path} (set policy.lora as the run did: {meta.get('lora', 'unknown')})")
        return
    missing, unexpected = model.transformer.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_rollout_key(k)]  # π_old's adapter is no part of a policy file
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the configured policy: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


# ---- LoRA ---------------------------------------------------------------------------------
ADAPTER = "default"
ROLLOUT_ADAPTER = "rollout"  # π_old's copy of the adapter (``RolloutAdapter``), on the same module


def add_lora(model: SD3Velocity, rank: int, alpha: float, target_modules: list[str]) -> SD3Velocity:
    """Add a LoRA adapter (peft, through diffusers' adapter API) to the transformer's layers
    named by ``target_modules``; only the adapter trains, in float32 whatever the base's dtype.
    LoRA's B starts at zero, so the adapted model computes exactly what the base model does
    until it trains."""
    from peft import LoraConfig

    model.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                                             init_lora_weights=True), adapter_name=ADAPTER)
    for name, param in model.named_parameters():  # the adapter trains in float32 under bf16/fp16 weights
        if is_adapter_key(name) and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
    return model


def is_adapter_key(name: str) -> bool:
    """A state-dict key of the policy's LoRA adapter (peft names them ``…lora_A.<adapter>…`` /
    ``…lora_B.<adapter>…``); the rollout adapter's keys (``RolloutAdapter``) are not."""
    return _is_lora_key(name) and not _is_rollout_key(name)


def _is_lora_key(name: str) -> bool:
    """A key of any LoRA adapter on the module (the policy's or the rollout's)."""
    return "lora_" in name


def _is_rollout_key(name: str) -> bool:
    parts = name.split(".")
    return any(a.startswith("lora_") and b == ROLLOUT_ADAPTER for a, b in zip(parts, parts[1:], strict=False))


def is_adapted(model: nn.Module) -> bool:
    return any(is_adapter_key(name) for name, _ in model.named_parameters())


def lora_settings(model: SD3Velocity) -> dict[str, Any]:
    cfg = model.transformer.peft_config[ADAPTER]
    return {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha), "target_modules": sorted(cfg.target_modules)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (what trains, and all that needs publishing or saving)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def published_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a learner publishes of ``model`` and a sampler receives into: the adapter of an
    adapted policy, every tensor otherwise (one rule for both ends of the sync)."""
    return adapter_state(model) if is_adapted(model) else model.state_dict()


def load_adapter(model: SD3Velocity, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a saved adapter (transformer keys) onto an adapted policy built on its base;
    refuses, loading nothing, one whose tensors are not exactly this policy's adapter."""
    want = {k for k in model.transformer.state_dict() if is_adapter_key(k)}
    if set(state) != want:
        raise ValueError(f"{where} holds {len(state)} adapter tensors, this policy's adapter {len(want)} "
                         "(another LoRA rank or target modules?)")
    model.transformer.load_state_dict(state, strict=False)


class AdapterDisabled(nn.Module):
    """The base model under an adapted policy: the same module with its adapter switched off
    for the call (the reference of an adapted policy costs no second copy)."""

    def __init__(self, policy: SD3Velocity) -> None:
        super().__init__()
        self._policy = [policy]  # a list, so the policy is not registered (nor saved) twice

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbeddings) -> torch.Tensor:
        policy = self._policy[0]
        with _requires_grad_kept(policy):  # peft's enable_adapters makes the active adapter trainable
            policy.transformer.disable_adapters()
            try:
                return policy(x_t, t, cond)
            finally:
                policy.transformer.enable_adapters()

    def base_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._policy[0].state_dict().items() if not _is_lora_key(k)}


@contextlib.contextmanager
def _requires_grad_kept(module: nn.Module) -> Iterator[None]:
    """Every parameter of ``module`` ends as trainable or frozen as it began: peft's adapter
    switches (``set_adapter``, ``enable_adapters``) set requires_grad by which adapter is active."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class RolloutAdapter:
    """π_old of a LoRA policy as a second peft adapter (``"rollout"``) on the policy's own
    transformer: the frozen rollout policy costs one adapter's bytes, not a copy of the base.

    Built from an adapted ``SD3Velocity`` (its ``"default"`` adapter trains), it adds an adapter of
    the same ``LoraConfig``, holding a copy of the policy's adapter, frozen. A call computes the
    velocity with the rollout adapter in place of the policy's, under ``no_grad`` and in eval
    mode, then restores the active adapter, each parameter's requires_grad and each module's
    train/eval mode, also when the forward raises. ``state``/``load`` speak the policy's adapter
    keys (``…lora_A.default.weight``), so what it publishes is what a sampler's single-adapter
    policy receives; ``is_adapter_key`` and everything built on it ignore the rollout adapter.
    """

    def __init__(self, policy: SD3Velocity) -> None:
        if not is_adapted(policy):
            raise ValueError("RolloutAdapter needs a LoRA policy (add_lora); copy a full policy instead")
        transformer = policy.transformer
        if ROLLOUT_ADAPTER in transformer.peft_config:
            raise ValueError(f"the policy already carries a {ROLLOUT_ADAPTER!r} adapter")
        self._policy = policy
        config = copy.deepcopy(transformer.peft_config[ADAPTER])
        device = transformer.device
        layers = _tuner_layers(transformer)
        active = [list(m.active_adapters) for m in layers]
        # the new adapter's initial weights are overwritten below: drawing them must leave the
        # global RNG where it was, as a deepcopy would
        with (_requires_grad_kept(policy),
              torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
              warnings.catch_warnings()):
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            transformer.add_adapter(config, adapter_name=ROLLOUT_ADAPTER)  # makes it the active one
            for m, names in zip(layers, active, strict=True):
                m.set_adapter(names)
        with torch.no_grad():
            for own, rollout in self._pairs():  # the adapter's dtype (float32 under a bf16 base, see add_lora)
                rollout.data = own.detach().clone()
                rollout.requires_grad_(False)

    def _pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(policy adapter tensor, its rollout counterpart) for each key of ``adapter_state``."""
        held = self._policy.state_dict(keep_vars=True)
        rollout = self._rollout_tensors()
        return [(v, rollout[k]) for k, v in held.items() if is_adapter_key(k)]

    def _rollout_tensors(self) -> dict[str, torch.Tensor]:
        """The rollout adapter's tensors under the policy adapter's key names."""
        return {_policy_key(k): v for k, v in self._policy.state_dict(keep_vars=True).items() if _is_rollout_key(k)}

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: PromptEmbeddings) -> torch.Tensor:
        """π_old's velocity (detached): the policy's module with the rollout adapter active."""
        policy = self._policy
        layers = _tuner_layers(policy.transformer)
        if any(m.merged for m in layers):
            raise RuntimeError("the policy's adapter is merged into its weights; unmerge it before calling π_old")
        active = [list(m.active_adapters) for m in layers]
        modes = [(m, m.training) for m in policy.modules()]
        with _requires_grad_kept(policy), torch.no_grad():
            try:
                policy.eval()
                for m in layers:
                    m.set_adapter(ROLLOUT_ADAPTER, inference_mode=True)
                return policy(x_t, t, cond)
            finally:
                for m, names in zip(layers, active, strict=True):
                    m.set_adapter(names)
                for m, mode in modes:
                    m.training = mode

    def state(self) -> dict[str, torch.Tensor]:
        """The rollout adapter's tensors (detached, not copied), named as ``published_state(policy)``
        names the policy's: what a sampler's policy loads as its own adapter."""
        return {k: v.detach() for k, v in self._rollout_tensors().items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        """The rollout adapter ← ``state`` (keys as ``state()`` names them); refuses, loading
        nothing, a state that is not exactly this policy's adapter."""
        own = self._rollout_tensors()
        if set(state) != set(own):
            raise ValueError(f"the rollout state holds {len(state)} adapter tensors, this policy's adapter "
                             f"{len(own)} (another LoRA rank or target modules?)")
        wrong = [k for k, v in own.items() if state[k].shape != v.shape]
        if wrong:
            raise ValueError(f"the rollout state's {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, this "
                             f"policy's adapter {tuple(own[wrong[0]].shape)} (another LoRA rank?)")
        for k, v in own.items():
            v.copy_(state[k])

    @torch.no_grad()
    def copy_from_policy(self) -> None:
        """π_old ← π_θ (the adapters; the base is shared)."""
        for own, rollout in self._pairs():
            rollout.copy_(own)

    @torch.no_grad()
    def ema_from_policy(self, decay: float) -> None:
        """π_old ← decay·π_old + (1 − decay)·π_θ, adapter tensor by adapter tensor."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        for own, rollout in self._pairs():
            rollout.lerp_(own, 1.0 - decay)


def _policy_key(rollout_key: str) -> str:
    """A rollout adapter's key renamed to the policy adapter's (``lora_A.rollout`` → ``lora_A.default``)."""
    parts = rollout_key.split(".")
    for i in range(len(parts) - 1):
        if parts[i].startswith("lora_") and parts[i + 1] == ROLLOUT_ADAPTER:
            parts[i + 1] = ADAPTER
    return ".".join(parts)


def _tuner_layers(transformer: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]
