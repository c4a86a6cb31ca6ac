"""The `llava-circuits` command: each subcommand is a plain typed function; its flags come from its signature."""
from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from typing import Callable, Sequence

from docstring_parser import parse as parse_docstring


def _command(subparsers, name: str, fn: Callable, positional: Sequence[str] = ()) -> argparse.ArgumentParser:
    """Add subcommand `name` running `fn`: listed params are positional, the rest `--flags`, help from the docstring."""
    doc = parse_docstring(fn.__doc__ or "")
    helps = {p.arg_name: p.description for p in doc.params}
    parser = subparsers.add_parser(name, help=doc.short_description, description=doc.short_description)
    hints = typing.get_type_hints(fn)
    for param in inspect.signature(fn).parameters.values():
        hint, default = hints.get(param.name, str), param.default
        base, is_list = _base_type(hint)
        kwargs = dict(help=helps.get(param.name))
        if param.name in positional:
            parser.add_argument(param.name, metavar=param.name.upper(), type=base, **kwargs)
        elif base is bool:
            parser.add_argument(f"--{param.name}", action=argparse.BooleanOptionalAction, default=default, **kwargs)
        else:
            required = default is inspect.Parameter.empty
            parser.add_argument(
                f"--{param.name}", type=base, required=required, default=None if required else default,
                action="append" if is_list else None, metavar=param.name.upper(), **kwargs,
            )
    parser.set_defaults(_fn=fn)
    return parser


def _base_type(hint) -> tuple[type, bool]:
    """The scalar type argparse converts to, and whether the flag repeats (list[...])."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return (hint if isinstance(hint, type) else str), False


def _group(subparsers, name: str, help: str):
    """A subcommand that holds subcommands (`toy data`, `hub push`, ...)."""
    parser = subparsers.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest=f"_sub_{name}", required=True, metavar="COMMAND")


def build_parser() -> argparse.ArgumentParser:
    from llava_circuits import bench, demo, hub
    from llava_circuits.attention import commands as attention
    from llava_circuits.evaluation import run
    from llava_circuits.toy.train import toy_plant, toy_train
    from llava_circuits.toy.writers import toy_data

    parser = argparse.ArgumentParser(
        prog="llava-circuits",
        description="Open up vision-language models: find the parts that cause a failure, and change them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(sub, "demo", demo.demo)
    toy = _group(sub, "toy", "The toy world: its benchmark files and its training recipe")
    _command(toy, "data", toy_data)
    _command(toy, "train", toy_train)
    _command(toy, "plant", toy_plant)
    _command(sub, "eval", run.evaluate, positional=["bench"])
    _command(sub, "score", run.score, positional=["bench"])
    attn = _group(sub, "attention", "Attention to the image by generation step, layer and head; localization heads")
    _command(attn, "extract", attention.extract)
    _command(attn, "find-heads", attention.find_heads)
    hub_cmds = _group(sub, "hub", "Push artifacts and model directories to the Hugging Face Hub, and pull them")
    _command(hub_cmds, "push", hub.push, positional=["dir", "repo_id"])
    _command(hub_cmds, "pull", hub.pull, positional=["repo_id"])
    from llava_circuits.steering import barrier, steerfair

    sf = _group(sub, "steerfair", "SteerFair: per-head directions of answer-position bias, fitted and steered away")
    _command(sf, "fit", steerfair.steerfair_fit)
    _command(sf, "eval", steerfair.steerfair_eval)
    bar = _group(sub, "barrier", "Dual-phase barrier steering that keeps attention on the image")
    _command(bar, "eval", barrier.barrier_eval)
    from llava_circuits.pruning import commands as pruning

    pr = _group(sub, "prune", "Soft pruning of attention heads tied to social bias: localize, apply, fine-tune, evaluate")
    _command(pr, "localize", pruning.prune_localize)
    _command(pr, "apply", pruning.prune_apply)
    _command(pr, "finetune", pruning.prune_finetune)
    _command(pr, "eval", pruning.prune_eval)
    from llava_circuits.transcoders.io import transcoders_export

    tc = _group(sub, "transcoders", "Sparse MLP replacements for every layer, trained from one forward pass")
    for name, what in (("fit", "Train (LightningCLI: -c CONFIG, --trainer.*, --model.*, --ckpt_path last)"),
                       ("validate", "Validate a checkpoint: FVU, L0, dead features, replacement KL and agreement")):
        tc.add_parser(name, help=what, add_help=False)  # parsed by LightningCLI in main()
    _command(tc, "export", transcoders_export)
    from llava_circuits.features import capture as fcapture, classify as fclassify, mapping as fmapping
    from llava_circuits.features import plots as fplots, stats as fstats, steer as fsteer

    ft = _group(sub, "features", "Transcoder features that separate good answers from bad: capture, classify, analyze, map, steer")
    _command(ft, "capture", fcapture.features_capture, positional=["bench"])
    _command(ft, "classify", fclassify.features_classify)
    _command(ft, "analyze", fstats.features_analyze)
    _command(ft, "map", fmapping.features_map)
    _command(ft, "steer", fsteer.features_steer)
    _command(ft, "plot", fplots.features_plot)
    from llava_circuits.attribution.commands import attribute

    _command(sub, "attribute", attribute)
    _command(sub, "bench", bench.bench, positional=["name"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["transcoders"] and argv[1:2] in (["fit"], ["validate"]):
        from llava_circuits.transcoders.module import transcoders_cli

        transcoders_cli(argv[1:], prog="llava-circuits transcoders")
        return 0
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    fn = args.pop("_fn")
    for key in [k for k in args if k == "command" or k.startswith("_sub")]:
        args.pop(key)
    try:
        fn(**args)
    except (ValueError, FileNotFoundError) as err:
        print(f"llava-circuits: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
