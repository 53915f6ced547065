"""The `tfcal` command line: argument parsing and exit codes only.

Exit codes: 0 ok; 1 a check failed (`drift`); 2 bad input or usage (one line, no traceback
unless `--debug`), including an output place that is full, read-only or not writable; 3 an
internal error (a bug: please report it with `--debug` output);
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from tfcal import TfcalError, TfcalWarning
from tfcal import config as config_lib
from tfcal.atomic import disk_error
from tfcal.coco import evaluation
from tfcal.raw import convert_raw_outputs
from tfcal.tuning import report as report_lib

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

_EPILOG = "Exit codes: 0 ok, 1 a check failed (drift), 2 bad input or usage, 3 internal error."


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _add_runner(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", choices=("local", "beam"), default=None,
                   help="where the detector runs (default: the config's runner.kind)")
    p.epilog = (_EPILOG + " Beam pipeline flags go after --, replace runner.beam_options and "
                "select the Beam runner: tfcal tune my.yaml -- --runner=DataflowRunner "
                "--project=P --region=R --temp_location=gs://B/tmp")


def _with_runner(cfg, args):
    """`cfg` with the command line's --runner and Beam flags (they win over the config)."""
    import dataclasses

    runner = cfg.runner
    if args.runner is not None:
        runner = dataclasses.replace(runner, kind=args.runner)
    if args.beam_options:
        bad = [f for f in args.beam_options if not f.startswith("--")]
        if bad:
            raise TfcalError(f"{cfg.source}: runner.beam_options (command line, after --): "
                             f"must be Beam pipeline flags like --runner=DirectRunner, got "
                             f"{bad[0]!r}")
        runner = dataclasses.replace(runner, kind="beam", beam_options=tuple(args.beam_options))
    return dataclasses.replace(cfg, runner=runner)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfcal",
        description="Calibrate detector scores, tune a score threshold and NMS IoU per class, "
                    "and export the result as a TF Serving SavedModel.",
        epilog=_EPILOG)
    _add_common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "tune", help="calibrate, search thresholds and IoU per class, report, then export",
        description="Run the detector over the COCO validation set (cached), fit calibration and "
                    "search (min_score_thresh, nms_iou) per class on the tune split, report on "
                    "the holdout split, and export when export.enabled is true.",
        epilog=_EPILOG)
    p.add_argument("config", type=Path, help="YAML config (see configs/example.yaml)")
    p.add_argument("--no-export", action="store_true", help="skip the export even if enabled")
    _add_runner(p)
    _add_common(p)

    p = sub.add_parser(
        "export", help="export the tuned post-processing as a TF Serving SavedModel",
        description="Append <output.dir>/postprocess.json to the tuned detector (detector.json "
                    "beside it: model.saved_model or model.path) and write "
                    "export.dir/<model_name>/<version>/ with models.config, batching parameters "
                    "and warmup requests (a TFLite detector or precomputed raw outputs: the "
                    "post-processing alone, as <model_name>_postprocess).",
        epilog=_EPILOG)
    p.add_argument("config", type=Path, help="the YAML config used by `tfcal tune`")
    p.add_argument("--version", type=int, default=None, help="version number (default: next free)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing version")
    p.add_argument("--postprocess-only", action="store_true",
                   help="export only the post-processing (raw boxes and scores in), as the "
                        "model <export.model_name>_postprocess")
    _add_common(p)

    p = sub.add_parser(
        "evaluate", help="COCO metrics and per-class TP/FP/FN of a COCO results file",
        description="Evaluate a COCO results JSON (list of {image_id, category_id, bbox, score}) "
                    "against COCO annotations with pycocotools.",
        epilog=_EPILOG)
    p.add_argument("--annotations", type=Path, required=True, help="COCO instances JSON")
    p.add_argument("--detections", type=Path, required=True, help="COCO results JSON")
    p.add_argument("--match-iou", type=float, default=0.5, help="IoU for TP/FP/FN (default 0.5)")
    p.add_argument("--out", type=Path, default=None, help="write the report JSON here")
    _add_common(p)

    p = sub.add_parser(
        "report", help="re-render report.md and plots from a report.json",
        description="Re-render report.md (and plots, when their data is present) from report.json.",
        epilog=_EPILOG)
    p.add_argument("report", type=Path, help="report.json, or the run directory holding it")
    _add_common(p)

    p = sub.add_parser(
        "drift", help="re-check calibration and per-class precision on newly labelled data",
        description="Run the tuned post-processing on newly labelled COCO data and compare ECE "
                    "and per-class precision at the deployed thresholds with the tuning report "
                    "(one-sided exact tests). Exits 1 on drift as the config's drift section "
                    "defines it, 2 when the detector is not the one tuned.",
        epilog=_EPILOG)
    p.add_argument("config", type=Path, help="the YAML config used by `tfcal tune`")
    p.add_argument("--annotations", type=Path, required=True, help="new COCO instances JSON")
    p.add_argument("--images", type=Path, default=None,
                   help="directory of the new images (needed to run the config's saved_model)")
    p.add_argument("--raw-outputs", type=Path, default=None,
                   help="precomputed raw outputs of the new images (.npz or cache folder), "
                        "instead of running the model")
    p.add_argument("--out", type=Path, default=None,
                   help="a new file for the result, or a folder for drift-<UTC time>.json "
                        "(default: <output.dir>/drift/); an earlier result is never replaced")
    _add_runner(p)
    _add_common(p)

    p = sub.add_parser(
        "convert-raw-outputs", help="convert a raw-outputs .npz to a raw-output folder",
        description="Convert precomputed raw outputs (.npz with image_ids, boxes, scores; "
                    "compressed or not) to the raw-output folder format, reading a batch of rows "
                    "at a time; give the folder as model.raw_outputs.",
        epilog=_EPILOG)
    p.add_argument("npz", type=Path, help="the .npz to convert")
    p.add_argument("out", type=Path, help="the folder to create (must not exist)")
    _add_common(p)

    p = sub.add_parser(
        "demo", help="run the whole job on the embedded synthetic dataset and detector",
        description="Generate a synthetic COCO dataset, run the bundled demo detector, calibrate, "
                    "tune for precision >= 0.9 per class, report and export. No downloads.",
        epilog=_EPILOG)
    p.add_argument("--out", type=Path, default=Path("runs/demo"),
                   help="working directory for data, report and export (default runs/demo)")
    p.add_argument("--num-images", type=int, default=None, help="images to generate")
    _add_common(p)
    return parser


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with file descriptor 2 silenced.

    TensorFlow's C++ runtime prints start-up lines (oneDNN, CUDA probing) to stderr before its
    log settings apply; they are noise for a CLI user. Real errors surface later as exceptions.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf
            tf.config.list_physical_devices()
            tf.constant(0)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _run(args: argparse.Namespace) -> int:
    # Each command's module is imported when it runs, after TensorFlow was imported quietly
    # (`main`): tuning, drift and the demo load TensorFlow.
    if args.command == "tune":
        cfg = _with_runner(config_lib.load_config(args.config), args)
        from tfcal.tuning import pipeline  # TensorFlow
        result = pipeline.run_tune(cfg, export=not args.no_export)
        print(result.summary())
        return EXIT_OK
    if args.command == "export":
        cfg = config_lib.load_config(args.config)
        from tfcal.tuning import pipeline  # TensorFlow
        result = pipeline.run_export(cfg, version=args.version, overwrite=args.overwrite,
                                     postprocess_only=args.postprocess_only)
        print(result.summary())
        return EXIT_OK
    if args.command == "evaluate":
        result = evaluation.run_evaluate(args.annotations, args.detections,
                                         match_iou=args.match_iou, out=args.out)
        print(result.summary())
        return EXIT_OK
    if args.command == "report":
        path = report_lib.render_report(args.report)
        print(f"report: {path}")
        return EXIT_OK
    if args.command == "drift":
        cfg = _with_runner(config_lib.load_config(args.config), args)
        from tfcal.tuning import drift  # TensorFlow
        result = drift.run_drift(cfg, args.annotations, args.images,
                                 raw_outputs=args.raw_outputs, out=args.out)
        print(result.summary())
        return EXIT_OK if result.ok else EXIT_CHECK_FAILED
    if args.command == "convert-raw-outputs":
        print(f"raw outputs: {convert_raw_outputs(args.npz, args.out)}")
        return EXIT_OK
    if args.command == "demo":
        from tfcal.demo.run import run_demo  # TensorFlow
        result = run_demo(args.out, num_images=args.num_images)
        print(result.summary())
        return EXIT_OK
    raise AssertionError(args.command)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """tfcal's own warnings as one line for the user (the source location is for --debug)."""
    if issubclass(category, TfcalWarning):
        print(f"tfcal: warning: {message}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tfcal` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_flags: list[str] = []
    if "--" in argv:  # Beam's own pipeline flags, passed through as given
        cut = argv.index("--")
        argv, beam_flags = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.beam_options = beam_flags
    if beam_flags and args.command not in ("tune", "drift"):
        print(f"tfcal: error: Beam flags after -- apply to tune and drift only, not "
              f"{args.command}", file=sys.stderr)
        return EXIT_BAD_INPUT
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tfcal").setLevel(logging.DEBUG if args.debug else logging.INFO)
    for noisy in ("tensorflow", "absl", "h5py", "matplotlib", "PIL", "apache_beam"):
        logging.getLogger(noisy).setLevel(logging.WARNING if args.debug else logging.ERROR)
    try:
        if args.command not in ("report", "evaluate", "convert-raw-outputs") and not args.debug:
            _import_tensorflow_quietly()
        with warnings.catch_warnings():
            if not args.debug:
                warnings.showwarning = _show_warning
            return _run(args)
    except TfcalError as err:
        if args.debug:
            raise
        print(f"tfcal: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        reason = disk_error(err)
        if args.debug or not reason:
            if args.debug:
                raise
            print(f"tfcal: internal error: {type(err).__name__}: {err} (rerun with --debug)",
                  file=sys.stderr)
            return EXIT_INTERNAL
        # A full disk, a read-only or foreign folder: the place is bad, not tfcal.
        where = err.filename or "output"
        print(f"tfcal: error: {where}: cannot write: {reason}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("tfcal: interrupted; no partial output was kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the one place that turns bugs into an exit code
        if args.debug:
            raise
        print(f"tfcal: internal error: {type(err).__name__}: {err} (rerun with --debug)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
