"""``diffusolve train digits``, ``digits-tokens``, ``digits-classifier``,
``digits-clean-classifier``, ``digits-lcm [--lora]`` and ``digits-mmd`` (thin argparse
layer)."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register", "main"]


def _check_args(args: argparse.Namespace, outputs: tuple[str, ...]) -> None:
    """Before any work: --out is a usable folder without earlier results (the packaged
    weights included) unless --force, and the counts are positive."""
    from .._paths import check_dir_out

    check_dir_out(args.out, files=outputs, force=args.force)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")


def _run(args: argparse.Namespace, config_cls: Any, train: Any, outputs: tuple[str, ...]) -> int:
    """Shared body of the train sub-commands: guard the output, apply overrides, train."""
    _check_args(args, outputs)
    cfg = config_cls(seed=args.seed)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    info = train(cfg, args.out, progress=not args.quiet)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))
    return 0


def _digits(args: argparse.Namespace) -> int:
    from .digits import DigitsConfig, train_digits

    return _run(args, DigitsConfig, train_digits, ("unet", "scheduler", "train_info.json"))


def _digits_tokens(args: argparse.Namespace) -> int:
    from .digits_tokens import OUTPUTS, DigitsTokensConfig, train_digits_tokens

    return _run(args, DigitsTokensConfig, train_digits_tokens, OUTPUTS)


def _classifier(args: argparse.Namespace) -> int:
    from .classifier import ClassifierConfig, train_classifier

    outputs = ("classifier.safetensors", "classifier_config.json")
    return _run(args, ClassifierConfig, train_classifier, outputs)


def _clean_classifier(args: argparse.Namespace) -> int:
    from .clean_classifier import CleanClassifierConfig, outputs, train_clean_classifier

    _check_args(args, outputs(args.role))
    cfg = CleanClassifierConfig(seed=args.seed, role=args.role)
    for name in ("steps", "batch_size", "width"):
        if getattr(args, name) is not None:
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
            setattr(cfg, name, getattr(args, name))
    info = train_clean_classifier(cfg, args.out, progress=not args.quiet)
    print(json.dumps(info, indent=2))
    return 0


def _lcm(args: argparse.Namespace) -> int:
    from .lcm import LCMConfig, outputs, train_lcm

    if args.lora and args.out == "digits-lcm":
        args.out = "digits-lcm-lora"
    _check_args(args, outputs(args.lora))
    cfg = LCMConfig(seed=args.seed, lora=args.lora, init=args.init)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.batch_size is not None:
        cfg.batch_size = args.batch_size
    if args.rank is not None:
        if args.rank < 1:
            raise ValueError(f"--rank must be at least 1, got {args.rank}")
        cfg.rank = args.rank
    if args.lr is not None:
        if not args.lr > 0:
            raise ValueError(f"--lr must be positive, got {args.lr}")
        if args.lora:
            cfg.lora_lr = args.lr
        else:
            cfg.lr = args.lr
    info = train_lcm(cfg, args.out, progress=not args.quiet)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))
    return 0


def _mmd(args: argparse.Namespace) -> int:
    from .mmd import MMDConfig, outputs, train_mmd

    if args.init is not None and args.out == "digits-mmd":
        args.out = "digits-lcm-mmd"
    _check_args(args, outputs(args.init))
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    given = ("steps", "batch_size", "lr", "guide_weight", "pixel_weight", "stage_weight")
    kwargs = {k: getattr(args, k) for k in given if getattr(args, k) is not None}
    cfg = MMDConfig(seed=args.seed, init=args.init, **kwargs)
    info = train_mmd(cfg, args.out, progress=not args.quiet)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2))
    return 0


def _common(p: argparse.ArgumentParser, out: str = "digits-model", shipped: str = "digits") -> None:
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (default: the shipped recipe)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise")
    p.add_argument(
        "--batch-size", type=int, default=None, help="batch size (default: the recipe's)"
    )
    p.add_argument(
        "--out",
        default=out,
        help=f"output folder (default: ./{out}; the shipped weights were made with "
        f"--out src/diffusolve/assets/{shipped} --force)",
    )
    p.add_argument("--force", action="store_true", help="overwrite existing results in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(subparsers: Any) -> None:
    """Add the ``digits``, ``digits-tokens`` and ``digits-classifier`` sub-commands to the
    ``train`` group's ``subparsers`` (what ``parser.add_subparsers()`` returned for
    ``diffusolve train``).

    Each sub-command sets ``func`` (``func(args) -> exit code``) on the parsed namespace.

    Example:
        >>> import argparse
        >>> from diffusolve.train.cli import register
        >>> parser = argparse.ArgumentParser(prog="diffusolve train")
        >>> register(parser.add_subparsers(dest="train_command"))
        >>> parser.parse_args(["digits", "--steps", "10"]).steps
        10
    """
    p = subparsers.add_parser(
        "digits", help="class-conditional UNet on scikit-learn digits (16x16)"
    )
    _common(p)
    p.set_defaults(func=_digits)
    p = subparsers.add_parser(
        "digits-tokens",
        help="caption-conditioned UNet (cross-attention over word tokens) on the same digits",
    )
    _common(p, out="digits-tokens-model", shipped="digits-tokens")
    p.set_defaults(func=_digits_tokens)
    p = subparsers.add_parser(
        "digits-classifier", help="noise-aware digits classifier (FD-digits features)"
    )
    _common(p)
    p.set_defaults(func=_classifier)
    p = subparsers.add_parser(
        "digits-clean-classifier",
        help="off-the-shelf clean digits classifier (EluCD guide, or the independent judge)",
    )
    _common(p)
    p.add_argument(
        "--role",
        choices=("guide", "judge"),
        default="guide",
        help="which file to write: clean_classifier.* (guide) or judge_classifier.* (judge)",
    )
    p.add_argument("--width", type=int, default=None, help="base width (default 16)")
    p.set_defaults(func=_clean_classifier)
    p = subparsers.add_parser(
        "digits-lcm",
        help="consistency distillation of digits (LCM); --lora: as a LoRA adapter (LCM-LoRA)",
    )
    _common(p, out="digits-lcm", shipped="digits-lcm (--lora: digits-lcm-lora)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter, not all weights")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8)")
    p.add_argument("--init", default=None, help="continue from an earlier full digits-lcm folder")
    p.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 1e-4; LoRA 1e-3)"
    )
    p.set_defaults(func=_lcm)
    p = subparsers.add_parser(
        "digits-mmd",
        help="MMD fine-tuning of digits for a 2-evaluation DDIM sampler; --init digits-lcm: "
        "of a consistency model for its 2-evaluation lcm sampler",
    )
    _common(p, out="digits-mmd", shipped="digits-mmd (--init digits-lcm: digits-lcm-mmd)")
    p.add_argument(
        "--init",
        default=None,
        help="fine-tune this consistency model (bundled name or folder, e.g. digits-lcm) "
        "through its own lcm sampler (default output ./digits-lcm-mmd)",
    )
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4)")
    p.add_argument(
        "--guide-weight",
        type=float,
        default=None,
        help="weight of the MMD on the guide classifier's penultimate features (default 1)",
    )
    p.add_argument(
        "--pixel-weight",
        type=float,
        default=None,
        help="weight of an MMD on the pixels / their RMS (default 0: none)",
    )
    p.add_argument(
        "--stage-weight",
        type=float,
        default=None,
        help="weight of each MMD on the pooled outputs of the guide's first two stages "
        "(default 0: none)",
    )
    p.set_defaults(func=_mmd)


def main(argv: list[str] | None = None) -> int:
    """Run ``train ...`` on its own (``python -m diffusolve.train.cli train digits``)."""
    parser = argparse.ArgumentParser(prog="diffusolve")
    train = parser.add_subparsers(dest="command", required=True).add_parser("train")
    register(train.add_subparsers(dest="train_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
