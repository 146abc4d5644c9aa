"""``medadv bench STUDY.json``: the command line of a study."""
from pathlib import Path

from ..errors import InputError
from .cases import HELDOUT_PREFIX, write_heldout_cases
from .definition import load_study, resolve_study, study_from_lists
from .execution import run_study
from .scores import summary_rows, table_rows


def add_bench_command(commands):
    """``medadv bench``: registered by cli.py."""
    bench = commands.add_parser("bench", help="compare networks on cases under attacks and corruptions "
                                              "(resumable grid, local workers or a Dask cluster)")
    bench.add_argument("study", nargs="?", help="study file (JSON or YAML) with networks, cases and probes")
    bench.add_argument("--out", required=True, help="study folder (cells/ kept: run again to resume)")
    bench.add_argument("--networks", nargs="+", default=[], help="built-in names or model folders")
    bench.add_argument("--cases", nargs="+", default=[],
                       help="volume files, folders of NIfTI/NRRD pairs (NAME + NAME_seg), 'sample', or heldout:N")
    bench.add_argument("--attacks", nargs="+", default=[], help="attacks, each at every --epsilons")
    bench.add_argument("--epsilons", nargs="+", type=float, default=[])
    bench.add_argument("--corruptions", nargs="+", default=[], help="corruptions, each at every --severities")
    bench.add_argument("--severities", nargs="+", type=int, default=[])
    bench.add_argument("--steps", type=int, help="steps of the iterative attacks")
    bench.add_argument("--seed", type=int, help="seed of the probes' random draws (default 0)")
    bench.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    bench.add_argument("--scheduler", help="Dask distributed scheduler address (tcp://host:8786) to run the cells on")
    bench.add_argument("--write-cases", metavar="DIR", help="also write the held-out cases as NIfTI pairs to DIR")
    bench.set_defaults(handler=_bench)


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
        count = sum(int(c[len(HELDOUT_PREFIX):]) for c in study["cases"] if str(c).startswith(HELDOUT_PREFIX))
        write_heldout_cases(args.write_cases, count)

    def report(done, total, record):
        print("[{}/{}] {} ({:.1f} s)".format(done, total, record["key"], record["seconds"]), flush=True)

    run = run_study(study, args.out, workers=args.workers, scheduler=args.scheduler, progress=report)
    print("{} cell(s) computed, {} found stored; {}".format(len(run.computed), len(run.reused),
                                                           Path(args.out) / "report.html"))
    for row in summary_rows(table_rows(run.records)):
        if row["probe"] == "overall":
            print("{:<24} clean Dice {}  robustness {}  ROOD degradation {}".format(
                row["network"], _fmt(row["clean_dice"]), _fmt(row["robustness_score"]), _fmt(row["rood_degradation"])))
    return 0


def _fmt(value):
    return "-" if value is None else "{:.3f}".format(value)
