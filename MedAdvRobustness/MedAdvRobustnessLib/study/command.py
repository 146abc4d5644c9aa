"""``medadv bench STUDY.json``: the command line of a study (its parser is in cli.py, which imports no torch)."""
import sys
from pathlib import Path

from ..errors import InputError
from .cases import HELDOUT_PREFIX, write_heldout_cases
from .definition import load_study, resolve_study, study_from_lists
from .execution import run_study
from .scores import classification_summary_rows, summary_rows, table_rows


def _bench(args):
    if args.study:
        listed = [option for option, value in (("--networks", args.networks), ("--cases", args.cases),
                                                ("--attacks", args.attacks), ("--epsilons", args.epsilons),
                                                ("--corruptions", args.corruptions), ("--severities", args.severities),
                                                ("--steps", args.steps), ("--seed", args.seed)) if value not in (None, [])]
        if listed:
            raise InputError("give a study file or {}, not both: the study file sets them".format("/".join(listed)))
        study = load_study(args.study)
    else:
        params = {"steps": args.steps} if args.steps else {}
        study = study_from_lists(args.networks, args.cases, args.attacks, args.epsilons, args.corruptions,
                                 args.severities, params, 0 if args.seed is None else args.seed)
    if args.write_cases:
        resolve_study(study)  # bad input refused before anything is written
        count = sum(int(c[len(HELDOUT_PREFIX):]) for c in study["cases"]
                    if isinstance(c, str) and c.startswith(HELDOUT_PREFIX))
        write_heldout_cases(args.write_cases, count)

    def report(done, total, record):
        if not args.quiet:  # progress on stderr, the summary on stdout
            print("[{}/{}] {} ({:.1f} s)".format(done, total, record["key"], record["seconds"]), file=sys.stderr,
                  flush=True)

    run = run_study(study, args.out, workers=args.workers, scheduler=args.scheduler, progress=report,
                    device=args.device)
    print("{} cell(s) computed, {} found stored; {}".format(len(run.computed), len(run.reused),
                                                           Path(args.out) / "report.html"))
    rows = table_rows(run.records)
    for row in classification_summary_rows(rows):
        if row["probe"] == "overall":
            print(classifier_line(row))
    for row in summary_rows(rows):
        if row["probe"] == "overall":
            print("{:<24} clean Dice {}  robustness {}  ROOD degradation {}".format(
                row["network"], _fmt(row["clean_dice"]), _fmt(row["robustness_score"]), _fmt(row["rood_degradation"])))
            print(fragility_line(run.fragility.get((row["network"], "overall"), {})))
    return 0


def classifier_line(overall):
    """A classifier's line of the printed summary: clean accuracy, robustness score, median minimal perturbation."""
    return "{:<24} clean accuracy {}  robustness {}  median minimal perturbation L2 {} L-inf {}".format(
        overall["network"], _fmt(overall["clean_accuracy"]), _fmt(overall["robustness_score"]),
        _fmt(overall.get("median_minimal_l2_fraction")), _fmt(overall.get("median_minimal_linf_fraction")))


def fragility_line(overall):
    """The fragility of a network in the printed summary: the AUROC of its three error rankings and its mean
    instability."""
    return "{:<24} errors ranked (AUROC, mean over probes and cases): fragility {}  entropy {}  boundary {};  " \
           "instability {}".format("", *(_fmt(overall.get(key)) for key in (
               "fragility_auroc", "entropy_auroc", "boundary_auroc", "instability_mean")))


def _fmt(value):
    return "-" if value is None else "{:.3f}".format(value)
