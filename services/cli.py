"""The ``fmrl`` command: train, config, sample, export, reward-worker, pretrain-digits, pretrain-compose, train-classifier,\ntrain-digits-clip, make-tiny-sd3, eval."""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# No HF_HUB_OFFLINE here: the user's setting stands (a hub id in policy.pretrained downloads
# where a hub is reachable); what the project ships loads with local_files_only=True.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each option's default (an option without help text gets one that
    shows it; a default of None, whose meaning the help text gives, and a flag's False are not
    shown). Choices show as {a,b,...}, as argparse writes them."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shown_default(action):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return super()._get_help_string(action) if _shown_default(action) else action.help


def _shown_default(action: argparse.Action) -> bool:
    default = action.default
    return default is not None and default is not False and default != argparse.SUPPRESS and action.nargs != 0


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)  # every subcommand's too (add_parser passes none)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, not usage + traceback
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Overrides(argparse.Action):
    """``--set KEY=VALUE`` and bare ``KEY=VALUE`` words into one list, in command-line order
    (main() adds the words argparse leaves over after an option)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = [values] if isinstance(values, str) else list(values or [])
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *items])


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    """A command's config overrides: ``KEY=VALUE`` words, and ``--set KEY=VALUE`` (repeatable)."""
    parser.add_argument("set", nargs="*", action=_Overrides, metavar="KEY=VALUE",
                        help="override a config value: reward.components.0.weight=2, algorithm.name=flow_grpo, "
                        "rollout.prompts='[a handwritten one, the digit 2]' (README: Overrides and presets)")
    parser.add_argument("--set", action=_Overrides, dest="set", metavar="KEY=VALUE",
                        help="the same, as an option (repeatable)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fmrl")
    except PackageNotFoundError:  # a checkout run without installing it
        return "unknown (not installed)"


def _config_field(section: str, name: str) -> Callable[[str], Any]:
    """An argparse type: the text read as config field ``section.name`` (its type, bounds and
    finiteness), so a flag and the key it mirrors refuse the same values."""
    def parse(text: str) -> Any:
        from services import config

        try:
            return config.field_value(getattr(config, section), name, text)
        except config.ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _count(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type for an integer option in [lo, hi] (steps, epochs, seeds, sizes)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text[:40]!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {value}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi}, got {value}")
        return value

    return parse


_SEED = _count(0, 2**32 - 1)


def _one_line(exc: BaseException) -> str:
    """The first line of an error; an OSError as 'what: path' (its errno prefix says nothing)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: {exc.filename}" + (f" → {exc.filename2}" if exc.filename2 else "")
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 500 else f"{line[:500]}…"


def _config_name(path: str | None) -> str:
    return Path(path).stem if path else "digits_ac_flow"


def cmd_train(args: argparse.Namespace) -> int:
    from services.checkpoints import check_run_dir
    from services.config import load_config
    from services.driver import train
    from services.storage import RunStorage, is_uri

    overrides = list(args.set or [])
    if args.resume:
        if args.config or args.name:
            raise ValueError("--resume continues a run with its own config.yaml and name; "
                             "give only --set overrides (e.g. run.iterations=400)")
        if is_uri(args.resume):  # train() downloads what it resumes from, and checks it
            storage = RunStorage.of_run(args.resume)
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "config.yaml").write_text(storage.read_text("config.yaml"))
                cfg = load_config(Path(tmp) / "config.yaml",
                                  overrides + [f"run.name={storage.name}", f"run.out_dir={storage.out_dir}"], run=True)
            train(cfg, resume=storage.location)
            return 0
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
        check_run_dir(run_dir)  # before its config.yaml is read: it may be a link out of the run
        # train() refuses overrides a resumed run cannot honour, and writes config.yaml only
        # once the checkpoint has loaded
        overrides += [f"run.name={run_dir.name}", f"run.out_dir={run_dir.parent}"]
        train(load_config(run_dir / "config.yaml", overrides, run=True), resume=run_dir)
        return 0
    if args.name:
        overrides.append(f"run.name={args.name}")
    cfg = load_config(args.config, overrides)
    train(cfg, _config_name(args.config))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from services.eval_cmd import evaluate_checkpoint

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    r = evaluate_checkpoint(Path(args.checkpoint), args.config, Path(args.prompts) if args.prompts else None,
                            args.n, Path(args.out) if args.out else None, args.set)
    print(f"{'reward (CFG-free)':28s} {r['reward']:8.3f}")
    for name, value in r["rewards"].items():
        print(f"{'  ' + name:28s} {value:8.3f}")
    if r["accuracy"] is not None:
        print(f"{'held-out classifier acc.':28s} {r['accuracy']:8.3f}")
    print(f"{'diversity (mean pairwise)':28s} {r['diversity']:8.3f}")
    print(f"wrote {r['out']}/eval.json and grid.png ({len(r['prompts'])} prompts × {r['samples_per_prompt']})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from services.config import dump_config, explain, load_config

    if args.explain:
        print(explain(args.explain))
        return 0
    print(dump_config(load_config(args.config, args.set)), end="")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from services.eval_cmd import digits_prompt_warning, sample_seeds, sampler_for, write_pngs

    prompts = [p for p in args.prompt]
    if not prompts or any(not p.strip() for p in prompts):
        raise ValueError("give at least one non-blank --prompt")
    out = Path(args.out)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    sampler, kind, policy_file = sampler_for(Path(args.checkpoint), args.config, args.steps, args.shift, args.cfg_scale)
    if kind == "digits" and (warning := digits_prompt_warning(prompts)):
        print(warning, file=sys.stderr)
    seeds = sample_seeds(args.seed, len(prompts))
    traj = sampler.rollout(prompts, args.n, seeds)
    if out.suffix == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, images=traj.images, prompts=np.array(traj.prompt_list()))
        print(f"wrote {traj.images.shape[0]} images {traj.images.shape[1:]} uint8 to {out}")
        return 0
    info = {"checkpoint": str(policy_file), "steps": str(sampler.num_steps), "shift": f"{sampler.shift:g}",
            "cfg_scale": f"{sampler.cfg_scale:g}", "Software": "fmrl sample"}
    paths = write_pngs(traj, seeds, out, info)
    h, w = traj.images.shape[1:3]
    print(f"wrote {len(paths)} PNG images ({w}×{h}) to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from services.export import export_checkpoint

    r = export_checkpoint(Path(args.checkpoint), Path(args.out), merge=args.merge, config=args.config)
    what = {"lora": "a LoRA adapter (diffusers/PEFT layout)", "transformer": "a transformer directory",
            "pipeline": "a complete StableDiffusion3Pipeline"}[r["kind"]]
    print(f"wrote {what} with its model card to {r['out']} ({', '.join(r['files'])}); base: {r['base']}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from services.pretrain import pretrain_digits

    pretrain_digits(Path(args.out), steps=args.steps, seed=args.seed, eval_samples=args.eval_samples)
    return 0


def cmd_pretrain_compose(args: argparse.Namespace) -> int:
    from services.pretrain_compose import pretrain_compose

    pretrain_compose(Path(args.out), steps=args.steps, seed=args.seed, eval_samples=args.eval_samples,
                     canvases=args.canvases)
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from reward_workers.digits import HeldoutSVM, load_split, save_classifier, train_classifier

    split = load_split()
    model, acc = train_classifier(split, epochs=args.epochs, seed=args.seed)
    save_classifier(model, Path(args.out))
    svm = HeldoutSVM(split)
    print(f"reward CNN held-out accuracy {acc:.4f} ({len(split.heldout_labels)} images); wrote {args.out}")
    print(f"evaluation SVM held-out accuracy {svm.heldout_accuracy:.4f}")
    return 0


def cmd_train_digits_clip(args: argparse.Namespace) -> int:
    from reward_workers.digits_clip import save_digits_clip, train_digits_clip

    model, processor, metrics = train_digits_clip(steps=args.steps, seed=args.seed)
    out = save_digits_clip(model, processor, Path(args.out), metrics=metrics, steps=args.steps, seed=args.seed)
    for template, acc in metrics.items():
        print(f"held-out zero-shot accuracy {acc:.4f}  {template!r}")
    print(f"wrote {out}")
    return 0


def cmd_make_tiny_sd3(args: argparse.Namespace) -> int:
    from samplers.sd3 import build_tiny_sd3_pipeline, latent_shape, load_sd3_pipeline

    out = build_tiny_sd3_pipeline(Path(args.out), seed=args.seed, resolution=args.resolution)
    pipe = load_sd3_pipeline(str(out))  # what was written loads (and gives the sizes below)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name)
        params = sum(p.numel() for p in module.parameters())
        print(f"{name:15s} {type(module).__name__:28s} {params / 1e6:.3f} M parameters")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    c, h, w = latent_shape(pipe, args.resolution)
    print(f"wrote a tiny random StableDiffusion3Pipeline (seed {args.seed}; {args.resolution}×{args.resolution} "
          f"RGB images, latents {c}×{h}×{w}; scheduler shift {pipe.scheduler.config.shift:g}) "
          f"to {out} ({size / 1e6:.1f} MB)")
    return 0


def cmd_make_random_sd3(args: argparse.Namespace) -> int:
    if args.size == "tiny":  # exactly make-tiny-sd3
        return cmd_make_tiny_sd3(argparse.Namespace(out=args.out, seed=args.seed, resolution=args.resolution or 32))
    if args.resolution is not None:
        raise ValueError(f"--resolution sizes the tiny pipeline only; {args.size} has SD3.5-medium's sizes "
                         "(1024 px native, any multiple of 16 px renders)")
    import torch

    from samplers.sd3 import build_random_sd3_pipeline, load_sd3_pipeline

    out = build_random_sd3_pipeline(Path(args.out), args.size, seed=args.seed)
    pipe = load_sd3_pipeline(str(out), dtype=torch.bfloat16)  # what was written loads
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name)
        params = sum(p.numel() for p in module.parameters())
        print(f"{name:15s} {type(module).__name__:28s} {params / 1e6:10.3f} M parameters")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote a random {args.size} StableDiffusion3Pipeline (seed {args.seed}; SD3.5-medium's transformer, "
          f"SD3's VAE, small text encoders of SD3's widths; bfloat16) to {out} ({size / 1e9:.2f} GB)")
    return 0


def cmd_reward_worker(args: argparse.Namespace) -> int:
    from reward_workers.service import main as service_main

    return int(service_main(args.service_args, prog="fmrl reward-worker") or 0)


def build_parser() -> argparse.ArgumentParser:
    from reward_workers.digits import CLASSIFIER_FILE
    from reward_workers.registry import DIGITS_CLIP_DIR
    from samplers.compose import POLICY_FILE as COMPOSE_POLICY_FILE
    from samplers.digits import POLICY_FILE

    p = _Parser(prog="fmrl", description="Online RL fine-tuning of flow-matching text-to-image models.",
                epilog="`fmrl COMMAND --help` gives a command's options; `fmrl config --explain KEY` a config key.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    t = sub.add_parser("train", help="run a training job (default: the embedded digits world)")
    t.add_argument("--config", help="a shipped config by name (digits_ac_flow, sd3_tiny_cpu, ...) "
                   "or a YAML file (default: built-in defaults)")
    _add_overrides(t)
    t.add_argument("--name", help="run name (directory under run.out_dir)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue runs/NAME (or a run's URI, e.g. "
                   "s3://bucket/runs/NAME) from its last checkpoint (its config.yaml, plus any --set overrides)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="score a checkpoint with every configured reward, the held-out "
                       "classifier and diversity; writes eval.json and a sample grid")
    e.add_argument("--checkpoint", required=True, help="a run directory (its config and final checkpoint), "
                   "a checkpoint directory or a policy .safetensors")
    e.add_argument("--config", help="config for a checkpoint outside a run directory (default: built-in)")
    e.add_argument("--prompts", help="a file of prompts, one per line (default: the config's)")
    e.add_argument("-n", type=_config_field("EvalConfig", "samples_per_prompt"),
                   help="samples per prompt (default: eval.samples_per_prompt)")
    e.add_argument("--out", help="output directory (default: <run>/eval-<UTC time>)")
    _add_overrides(e)
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("config", help="print the resolved config, or explain a key")
    c.add_argument("--config", help="a shipped config by name (digits_ac_flow, sd3_tiny_cpu, ...) "
                   "or a YAML file (default: built-in defaults)")
    _add_overrides(c)
    c.add_argument("--explain", metavar="KEY", help="print KEY's description, type, choices, default and "
                   "presets (e.g. policy.sampler, reward.components.weight, algorithm)")
    c.set_defaults(func=cmd_config)

    s = sub.add_parser("sample", help="sample images from a checkpoint into PNG files or an .npz file")
    s.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir or policy .safetensors (an "
                   "adapter is loaded onto the base its run's config.yaml names)")
    s.add_argument("--config", help="config for a checkpoint outside a run directory (default: the run's; "
                   "a policy file alone: a digits policy)")
    s.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    s.add_argument("-n", type=_config_field("RolloutConfig", "samples_per_prompt"), default=64,
                   help="samples per prompt")
    s.add_argument("--out", required=True, help="a directory for PNG files (one per image, prompt and seed in "
                   "its text chunk), or a .npz file (arrays images, prompts)")
    s.add_argument("--steps", type=_config_field("PolicyConfig", "num_steps"),
                   help="Euler steps (default: the run's policy.num_steps, else 10)")
    s.add_argument("--shift", type=_config_field("PolicyConfig", "shift"),
                   help="SD3 time shift (default: the run's policy.shift, else 1)")
    s.add_argument("--cfg-scale", type=_config_field("PolicyConfig", "cfg_scale"),
                   help="classifier-free guidance scale (default: the run's policy.cfg_scale, else 1)")
    s.add_argument("--seed", type=_config_field("RunConfig", "seed"), default=0)
    s.set_defaults(func=cmd_sample)

    x = sub.add_parser("export", help="write a run's policy in the layouts diffusers loads, with a model card")
    x.add_argument("--checkpoint", required=True, help="a run directory (its final checkpoint), or a checkpoint "
                   "directory inside one")
    x.add_argument("--out", required=True, help="directory to write (new or empty)")
    x.add_argument("--merge", action="store_true", help="SD3: a complete StableDiffusion3Pipeline with the adapter "
                   "fused into its transformer, instead of the adapter file (pytorch_lora_weights.safetensors)")
    x.add_argument("--config", help="config for a checkpoint outside a run directory (default: the run's)")
    x.set_defaults(func=cmd_export)

    pt = sub.add_parser("pretrain-digits", help="pretrain the digits policy by flow matching")
    pt.add_argument("--out", default=str(POLICY_FILE))
    pt.add_argument("--steps", type=_count(1, 10**7), default=800,
                    help="optimiser steps; the shipped model is deliberately short-trained (see README)")
    pt.add_argument("--seed", type=_SEED, default=0)
    pt.add_argument("--eval-samples", type=_count(1, 1024), default=50,
                    help="samples per digit in the closing measurement")
    pt.set_defaults(func=cmd_pretrain)

    pc = sub.add_parser("pretrain-compose", help="pretrain the compositional digits policy by flow matching "
                        "(docs/compose.md)")
    pc.add_argument("--out", default=str(COMPOSE_POLICY_FILE))
    pc.add_argument("--steps", type=_count(1, 10**7), default=1500,
                    help="optimiser steps; the shipped model is deliberately short-trained (docs/compose.md)")
    pc.add_argument("--seed", type=_SEED, default=0)
    pc.add_argument("--eval-samples", type=_count(0, 1024), default=16,
                    help="samples per evaluation prompt in the closing measurement (0: none)")
    pc.add_argument("--canvases", type=_count(1, 10**7), default=20_000,
                    help="random compositions (with their true prompts) the flow matching draws from")
    pc.set_defaults(func=cmd_pretrain_compose)

    tc = sub.add_parser("train-classifier", help="train the digits reward classifier")
    tc.add_argument("--out", default=str(CLASSIFIER_FILE))
    tc.add_argument("--epochs", type=_count(1, 10**5), default=60)
    tc.add_argument("--seed", type=_SEED, default=0)
    tc.set_defaults(func=cmd_train_classifier)

    tcl = sub.add_parser("train-digits-clip", help="train the digits CLIP (the CLIP reward of the digits world)")
    tcl.add_argument("--out", default=str(DIGITS_CLIP_DIR))
    tcl.add_argument("--steps", type=_count(1, 10**7), default=1500)
    tcl.add_argument("--seed", type=_SEED, default=0)
    tcl.set_defaults(func=cmd_train_digits_clip)

    ts = sub.add_parser("make-tiny-sd3", help="write a tiny random StableDiffusion3Pipeline directory "
                        "(tests and offline SD3 runs; nothing is downloaded)")
    ts.add_argument("--out", required=True, help="directory to write (new, empty, or an earlier tiny pipeline)")
    ts.add_argument("--seed", type=_SEED, default=0, help="seed of the random weights")
    ts.add_argument("--resolution", type=_count(8, 4096), default=32, help="image side in pixels (a multiple of 8)")
    ts.set_defaults(func=cmd_make_tiny_sd3)

    rs = sub.add_parser("make-random-sd3", help="write a random StableDiffusion3Pipeline directory: tiny "
                        "(= make-tiny-sd3) or medium (SD3.5-medium's transformer and SD3's VAE, ~5 GB in bfloat16, "
                        "small text encoders; for GPU timing and memory checks)")
    rs.add_argument("--size", choices=["tiny", "medium"], default="tiny", help="the pipeline's size")
    rs.add_argument("--out", required=True, help="directory to write (new, empty, or an earlier pipeline)")
    rs.add_argument("--seed", type=_SEED, default=0, help="seed of the random weights")
    rs.add_argument("--resolution", type=_count(8, 4096),
                    help="tiny only: image side in pixels (a multiple of 8; default 32)")
    rs.set_defaults(func=cmd_make_random_sd3)

    rw = sub.add_parser("reward-worker", add_help=False,
                        help="serve a reward over Redis Streams (`fmrl reward-worker --help` for its options)")
    rw.add_argument("service_args", nargs=argparse.REMAINDER)
    rw.set_defaults(func=cmd_reward_worker)
    return p


def _cause(exc: BaseException) -> BaseException:
    """The error an actor raised, not Ray's wrapper (whose first line names the actor's pid)."""
    from ray.exceptions import RayTaskError

    while isinstance(exc, RayTaskError) and exc.cause is not None:
        exc = exc.cause
    return exc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["reward-worker"]:  # its options are the service's own (argparse's REMAINDER drops --flags)
        return cmd_reward_worker(argparse.Namespace(service_args=argv[1:]))
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)  # a usage error: exit 2, as argparse's own
        return 2
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "set") and not any(x.startswith("-") for x in extra):
        args.set = [*(args.set or []), *extra]  # KEY=VALUE words after an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fmrl: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ArithmeticError) as exc:
        # OSError: a taken metrics port, an out_dir that is a file, a disk that is full;
        # ArithmeticError: the learner's non-finite gradient. FMRL_DEBUG=1 shows the traceback.
        if os.environ.get("FMRL_DEBUG"):
            raise
        print(f"fmrl: error: {_one_line(_cause(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
