"""The ``safe`` command: train | eval | infer | data | fisher | info | report | reproduce."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _config(args):
    from safe_av.config import load_config

    return load_config(args.config, args.set)


def _audio_seconds(value: str) -> float:
    """``--max-audio-seconds``: the range ``data.max_audio_seconds`` accepts."""
    from safe_av.config import MAX_AUDIO_SECONDS

    seconds = float(value)
    if not 0 < seconds <= MAX_AUDIO_SECONDS:
        raise argparse.ArgumentTypeError(f"{value}: must be in (0, {MAX_AUDIO_SECONDS:g}]")
    return seconds


def _add_config(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, help="YAML config (see configs/)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. model.fusion.num_heads=4 train.seed=1 (repeatable: --set a=1 --set b=2)")


def cmd_train(args) -> int:
    from safe_av.training.loop import train

    cfg = _config(args)
    metrics = train(cfg, args.output_dir, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # several processes: the summary once, from rank 0
        return 0
    keys = ["original_vqa_accuracy", "safe_vqa_accuracy", "vl_retention", "avqa_accuracy",
            "audio_dependent_accuracy", "audio_masked_audio_dependent_accuracy", "audio_dependent_chance_accuracy"]
    for k in keys:
        if k in metrics and metrics[k] is not None:
            print(f"{k:42s} {metrics[k]:.4f}")
    print(f"wrote {args.output_dir}/metrics.json and {args.output_dir}/report.html")
    return 0


def cmd_eval(args) -> int:
    from safe_av.eval.run import evaluate_checkpoint, output_problem

    problem = output_problem(args.output)
    if problem:
        print(f"safe eval: error: {problem}", file=sys.stderr)
        return 2
    cfg = _config(args)
    result = evaluate_checkpoint(cfg, args.checkpoint, split=args.split, output=args.output)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}, indent=2))
    if not sum(result["n_evaluated"].values()):  # sets were found, but not one sample's files could be read
        print(f"safe eval: error: none of the {sum(result['n_samples'].values())} samples could be loaded (see the "
              f"skipped-sample warnings; `safe data validate` lists the files)", file=sys.stderr)
        return 1
    return 0


def cmd_infer(args) -> int:
    from safe_av.eval.run import infer_main

    return infer_main(args)


def cmd_data(args) -> int:
    if args.data_cmd == "synth":
        from safe_av.data.validate import main_synth

        return main_synth(args.out, args.seed)
    if args.data_cmd == "validate":
        from safe_av.data.validate import main_validate

        return main_validate(args)
    if args.data_cmd == "cache":
        from safe_av.data.cache import main_cache

        return main_cache(_config(args), args)
    return 2


def cmd_fisher(args) -> int:
    from safe_av.training.loop import Trainer

    cfg = _config(args)
    if not any("base" in p.train and p.unfreeze for p in cfg.train.phases):
        print("no phase unfreezes base modules: there is nothing for the Fisher penalty to protect", file=sys.stderr)
        return 2
    import tempfile

    cfg.loss.fisher_path = args.output
    with tempfile.TemporaryDirectory(prefix="safe-fisher-") as scratch:
        if args.output_dir is None:  # the set-up's run folder is not kept
            cfg.train.trackers = []
        trainer = Trainer(cfg, args.output_dir or scratch)
        trainer.setup()
        trainer._setup_fisher()
    print(f"wrote {args.output}")
    return 0


def cmd_info(args) -> int:
    from safe_av.info import main

    return main(_config(args))


def cmd_report(args) -> int:
    from safe_av.eval.report import main

    return main(args.run_dir)


def cmd_reproduce(args) -> int:
    from safe_av.reproduce import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    from safe_av.data.records import DATASETS

    parser = argparse.ArgumentParser(prog="safe", description="SAFE: teach a frozen VL model to hear.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="Stage A training (all phases + curriculum + evaluation)")
    _add_config(p)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from the latest checkpoint in --output-dir, or from a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="--output-dir holds an earlier run: remove its logs, checkpoints, adapter, Fisher and "
                        "report first (without this, or --resume, such a folder is refused)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a trained adapter")
    _add_config(p)
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (RUN), its adapter folder (RUN/adapter) or a checkpoint (RUN/checkpoints/step-N)")
    p.add_argument("--split", default=None,
                   help="one split for every set (default: VQA from data.vqa_eval_split, the others from data.eval_split)")
    p.add_argument("--output", required=True, help="JSON file to write")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("infer", help="answer questions about an image and/or an audio clip")
    p.add_argument("--checkpoint", required=True,
                   help="a run folder (RUN), its adapter folder (RUN/adapter) or a checkpoint (RUN/checkpoints/step-N)")
    p.add_argument("--image", help="image file, or a folder of video frames (the middle one is used)")
    p.add_argument("--audio", help="audio file")
    p.add_argument("--question", help='the question; "" asks for a caption of the audio. Without --image and '
                                      '--audio the language model answers from the text alone')
    p.add_argument("--input", help="JSONL with image, audio, question per line (instead of --question)")
    p.add_argument("--output", help="JSONL to write (with --input)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("data", help="datasets: synth | validate | cache")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    q = dsub.add_parser("synth", help="write the synthetic audio-visual corpus in the official formats")
    q.add_argument("--out", required=True)
    q.add_argument("--seed", type=int, default=0)
    q = dsub.add_parser("validate", help="read every record and open every file")
    q.add_argument("--format", required=True, choices=list(DATASETS))
    q.add_argument("--root", required=True)
    q.add_argument("--split", nargs="*", default=None, metavar="SPLIT",
                   help="splits to check (default: every standard split that has an annotation file); a named "
                        "split without one is an error")
    q.add_argument("--max-audio-seconds", type=_audio_seconds, default=None,
                   help="the part of each clip training uses (default: data.max_audio_seconds' default): a clip "
                        "silent there is bad")
    q = dsub.add_parser("cache", help="write the frozen audio-feature cache")
    _add_config(q)
    q.add_argument("--out", default=None, help="cache folder (default: data.feature_cache)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("fisher", help="estimate the diagonal Fisher on VL batches and write it")
    _add_config(p)
    p.add_argument("--output", required=True, help="safetensors file")
    p.add_argument("--output-dir", default=None,
                   help="keep the set-up's run folder (resolved config, tracker logs) here; default: a temporary one")
    p.set_defaults(func=cmd_fisher)

    p = sub.add_parser("info", help="parameters and memory per component (offline)")
    _add_config(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("report", help="write RUN_DIR/report.html")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("reproduce", help="baselines and ablations of the spec, same data and budget")
    _add_config(p, required=False)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "accelerate", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from safe_av.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"safe {args.cmd}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # e.g. a full disk while writing the results: no traceback, not a usage error
        print(f"safe {args.cmd}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
