"""``medadv``: attack a segmentation network on a volume file, headless, with Slicer's MRML core."""
import argparse
import glob
import importlib
import math
import os
import shutil
import signal
import sys
import textwrap
import time

from .errors import InputError
from .probes.parameters import Parameter, value_text

DEMO_EPSILONS = (0.005, 0.01, 0.02, 0.04)
DISTRIBUTION = "medadvrobustness"
MISSING_DASK = '--scheduler needs Dask distributed: pip install "medadvrobustness[dask]"'

# What the parser needs of the probe registry and of the networks, written out so that building it (`medadv
# --help`, `medadv run --help`) imports neither torch nor MONAI, which the registry's modules import:
# test_cli_polish.py checks these tables against registry_tables(); when a probe gains or changes a parameter,
# update them from what registry_tables() returns.
ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "cospgd", "dag", "deepfool", "deepfool-linf", "fgsm", "jsma", "pgd", "segpgd")  # probes.attacks.ATTACKS, sorted
CORRUPTION_NAMES = ("affine", "anisotropic_downsampling", "bias_field", "contrast_compression", "contrast_expansion",
                    "elastic_deformation", "ghosting", "motion", "rician_noise", "smoothing", "gibbs_ringing",
                    "kspace_spikes")  # probes.corruptions.CORRUPTIONS, in its order
SEVERITIES = (1, 2, 3, 4, 5)  # probes.corruptions.SEVERITIES
ACTIVATIONS = ("logits", "softmax", "sigmoid")  # networks.outputs.ACTIVATIONS
TASKS = ("segmentation", "classification")  # networks.models.TASKS
_ITERATIVE = ("pgd", "apgd-ce", "apgd-dlr", "cospgd", "segpgd")
_APGD = ("apgd-ce", "apgd-dlr")
_DEEPFOOL = ("deepfool", "deepfool-linf")


def _each(names, value):
    return dict.fromkeys(names, value)


# Every parameter of any probe (the default attack's, pgd's, where it takes it), with each probe's default.
PROBE_OPTIONS = (
    (Parameter("norm", "linf", str, "threat model", ("linf", "l2")), _each(_ITERATIVE, "linf")),
    (Parameter("steps", 10, int, "iterations (gradient evaluations) per restart"), dict(_each(_ITERATIVE, 10), dag=20, **_each(_DEEPFOOL, 50))),
    (Parameter("step_size", None, float, "step as a fraction of epsilon (default 2.5/steps)"),
     dict(_each(_ITERATIVE, None), **_each(_APGD, 2.0))),
    (Parameter("random_start", True, bool, "start at a random point of the epsilon ball (seeded)"),
     _each(_ITERATIVE, True)),
    (Parameter("restarts", 1, int, "random restarts; per volume the worst case is kept"), _each(_ITERATIVE, 1)),
    (Parameter("restart_criterion", "dice", str, "worst case of the restarts: lowest mean Dice against the labels "
               "(targeted: highest against the target) or highest loss", ("dice", "loss")),
     _each(("pgd", "cospgd", "segpgd"), "dice")),
    (Parameter("seed", 0, int, "seed of random starts and of the permute target"),
     _each(ATTACK_NAMES + CORRUPTION_NAMES, 0)),
    (Parameter("target_mode", None, str, "targeted attack: target map built from the labels",
               ("permute", "swap", "turn", "grow", "vanish")), dict(_each(ATTACK_NAMES, None), dag="permute")),
    (Parameter("source_label", None, int, "label A of swap/turn/grow/vanish"), _each(ATTACK_NAMES, None)),
    (Parameter("target_label", None, int, "label B of swap/turn"), _each(ATTACK_NAMES, None)),
    (Parameter("grow_voxels", 1, int, "grow: voxels label A spreads into its neighbours"), _each(ATTACK_NAMES, 1)),
    (Parameter("region_loss", False, bool, "restrict the loss (not only the perturbation) to the region"),
     _each(ATTACK_NAMES, False)),
    (Parameter("target_weight", None, float, "targeted: share of the loss on the voxels whose target differs from "
               "their label, the rest on keeping the others (Metzen et al. 2017); none: one mean over all voxels"),
     _each(ATTACK_NAMES, None)),
    (Parameter("momentum", 0.75, float, "weight alpha of the new step (1 - alpha: momentum)"), _each(_APGD, 0.75)),
    (Parameter("rho", 0.75, float, "halve the step when fewer than rho of the steps since the last checkpoint "
               "raised the loss"), _each(_APGD, 0.75)),
    (Parameter("gamma", 0.5, float, "L-infinity size of each step as a fraction of epsilon"), {"dag": 0.5}),
    (Parameter("scale_quantile", 1.0, float, "r is divided by this quantile of |r| and clipped to [-1, 1] (1: the "
               "paper's r/|r|inf)"), {"dag": 1.0}),
    (Parameter("overshoot", 0.02, float, "each step goes (1 + overshoot) times past the boundary"),
     _each(_DEEPFOOL, 0.02)),
    (Parameter("candidates", None, int, "classes considered: the top scoring ones of the clean volume (none: all)"),
     _each(_DEEPFOOL, None)),
    (Parameter("theta", 0.1, float, "change per chosen voxel, fraction of the intensity range (at most epsilon)"),
     {"jsma": 0.1}),
    (Parameter("max_fraction", 1.0, float, "largest share of the voxels changed (ART's gamma)"), {"jsma": 1.0}),
)


def registry_tables():
    """The tables above as the probe registry and the networks give them (imports torch)."""
    from .networks.models import TASKS as tasks
    from .networks.outputs import ACTIVATIONS as activations
    from .probes.attacks import ATTACKS
    from .probes.corruptions import CORRUPTIONS, SEVERITIES as severities
    from .probes.registry import probe_names, probe_parameters
    takers = {}
    for name in sorted(probe_names(), key=lambda name: name != "pgd"):
        for parameter in probe_parameters(name):
            takers.setdefault(parameter.name, (parameter, {}))[1][name] = parameter.default
    return {"attacks": tuple(sorted(ATTACKS)), "corruptions": tuple(CORRUPTIONS), "severities": tuple(severities),
            "activations": tuple(activations), "tasks": tuple(tasks), "probe_options": tuple(takers.values())}


def static_tables():
    """The tables the parser is built from, in the form of :func:`registry_tables`."""
    return {"attacks": ATTACK_NAMES, "corruptions": CORRUPTION_NAMES, "severities": SEVERITIES,
            "activations": ACTIVATIONS, "tasks": TASKS, "probe_options": PROBE_OPTIONS}


def package_version():
    """The installed distribution's version, else the package's ``__version__``, else ``unknown``."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # not installed (e.g. the Slicer extension's copy of the package)
        import MedAdvRobustnessLib
        return str(getattr(MedAdvRobustnessLib, "__version__", "unknown"))


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that what it staged is removed as on Ctrl-C. A BaseException, as
    KeyboardInterrupt is: the ``except Exception`` of the work (a bench cell's) lets it through rather than
    recording it as a failure."""


def _terminate(signum, frame):
    _ignore_further_stops()
    raise Terminated()


def _interrupt(signum, frame):
    _ignore_further_stops()
    raise KeyboardInterrupt()


def _ignore_further_stops():
    """Once stopping: a second Ctrl-C, SIGTERM or SIGHUP does not interrupt the clean-up of the first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for name in ("SIGHUP", "SIGQUIT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class HungUp(Terminated):
    """SIGHUP: the terminal went away."""


class Quit(Terminated):
    """SIGQUIT: Ctrl-\\ in the terminal."""


def _hang_up(signum, frame):
    _ignore_further_stops()
    raise HungUp()


def _quit(signum, frame):
    _ignore_further_stops()
    raise Quit()


def main(argv=None):
    signal.signal(signal.SIGINT, _interrupt)  # from the start: a Ctrl-C while VTK and torch import is one line too
    signal.signal(signal.SIGTERM, _terminate)
    if hasattr(signal, "SIGHUP"):  # the terminal closed (a dropped ssh session): clean up as on SIGTERM
        signal.signal(signal.SIGHUP, _hang_up)
    if hasattr(signal, "SIGQUIT"):  # Ctrl-\: stop and clean up as on Ctrl-C
        signal.signal(signal.SIGQUIT, _quit)
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.command_line = list(sys.argv) if argv is None else [parser.prog] + [str(item) for item in argv]
        _import_uninterrupted()
        return args.handler(args)
    except InputError as error:
        return _error(str(error), 2)
    except KeyboardInterrupt:
        return _error("interrupted (Ctrl-C); " + _what_is_kept(args), 130, "medadv: ")
    except HungUp:
        return _error("the terminal hung up (SIGHUP); " + _what_is_kept(args), 129, "medadv: ")
    except Quit:
        return _error("quit (SIGQUIT, Ctrl-\\); " + _what_is_kept(args), 131, "medadv: ")
    except Terminated:
        return _error("terminated (SIGTERM); " + _what_is_kept(args), 143, "medadv: ")
    except BrokenPipeError:  # the reader of the output went away (`medadv attacks | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except RuntimeError as error:
        if "CUDA out of memory" not in str(error) and type(error).__name__ != "OutOfMemoryError":
            raise
        return _error("the GPU ran out of memory; run on the CPU (--device cpu) or give the network a smaller "
                      "window (roi_size in model.json)", 2)
    except OSError as error:  # the system refused a file or folder (read-only, full disk, permissions)
        where = " {}".format(error.filename) if error.filename else ""
        return _error("cannot write or read{}: {}".format(where, error.strerror or error), 2)


def _what_is_kept(args):
    """What a stopped command leaves: nothing, or (bench) the cells it stored, which the same command reuses."""
    if args is None or args.handler.__name__ != "_bench":
        return "nothing was written"
    cells = os.path.join(str(args.out), "cells")
    stored = len(glob.glob(os.path.join(glob.escape(cells), "*.json")))
    if stored:
        return "the {} cell(s) finished so far are kept in {} (the same command goes on from them)".format(
            stored, cells)
    return "nothing was written"


def _error(message, status, prefix="medadv: error: "):
    print(prefix + message, file=sys.stderr)
    return status


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples: prose lines are joined and wrapped to the terminal, indented lines (the example
    commands) and blank lines kept as written."""

    def _fill_text(self, text, width, indent):
        lines, prose = [], []

        def flush():
            if prose:
                lines.extend(textwrap.wrap(" ".join(prose), width, initial_indent=indent, subsequent_indent=indent))
                del prose[:]

        for line in text.strip("\n").splitlines():
            if line.strip() and not line[0].isspace():
                prose.append(line.strip())
            else:
                flush()
                lines.append(indent + line if line.strip() else "")
        flush()
        return "\n".join(lines)


def memory_size(text):
    """argparse type: a size in bytes (``8G``, ``512M``, ``1048576``)."""
    from .networks.windowed import parse_bytes
    try:
        return parse_bytes(text)
    except (ValueError, OverflowError) as error:
        raise argparse.ArgumentTypeError(str(error))


def positive_int(text):
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a whole number, got {!r}".format(text))
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1, got {}".format(value))
    return value


def _examples(*commands):
    return "examples:\n" + "\n".join("  " + command for command in commands)


RESULTS_TEXT = """
The results folder holds per strength (0: clean) the adversarial or corrupted volume and the prediction
(NIfTI, on the input's grid), metrics.csv (Dice, HD95, ASD, SSIM, PSNR per strength and label), report.png,
scene.mrb (open it in 3D Slicer, or with 'medadv view'), rood_summary.json for a corruption, and run.json: the
command line, every setting with its default filled in, the seed, the SHA-256 of the input and model files and
the versions. It appears only when everything succeeded.
"""


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line: ``medadv: error: MESSAGE (see medadv COMMAND --help)``, status 2
    (raised as an :class:`InputError`, which :func:`main` prints); its subcommands' parsers are of this class."""

    def error(self, message):
        raise InputError("{} (see {} --help)".format(" ".join(message.split()), self.prog))


def build_parser():
    parser = Parser(
        prog="medadv", formatter_class=HelpFormatter,
        description=__doc__.replace("``", "") + "\n\n'medadv COMMAND --help' describes each command.",
        epilog=_examples("medadv demo --out demo-results              # PGD on the embedded sample and network",
                         "medadv view demo-results                    # look at it in the browser",
                         "medadv run --volume t1.nii.gz --model my-net/ --reference labels.nii.gz "
                         "--epsilon 0.01 0.02 --out results",
                         "medadv attacks                              # every attack and corruption"))
    parser.add_argument("--version", action="version", version="medadv " + package_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run", help="attack a network on a volume and write the results folder", formatter_class=HelpFormatter,
        description="Attack (or corrupt) a segmentation network on a volume at one or more strengths: --attack at "
                    "--epsilon budgets (default pgd), or --corruption at --severity levels. 'medadv attacks' lists "
                    "every probe with its parameters; each is an option below.\n" + RESULTS_TEXT,
        epilog=_examples(
            "medadv run --volume t1.nii.gz --model demo --reference labels.nii.gz --epsilon 0.01 0.02 --out pgd",
            "medadv run --volume t1.nii.gz --model my-net/ --attack apgd-dlr --epsilon 0.01 --restarts 2 --out apgd",
            "medadv run --volume t1.nii.gz --model bundle.zip --corruption bias_field --severity 1 3 5 --out bias",
            "medadv run --volume ct.nii.gz --model Dataset101_X/nnUNetTrainer__nnUNetPlans__3d_fullres --folds 0 "
            "--attack fgsm --epsilon 0.01 --device cuda --out nnunet"))
    run.add_argument("--volume", required=True, help="input volume (NIfTI, NRRD, ... any file Slicer reads)")
    run.add_argument("--model", required=True, help=MODEL_HELP)
    run.add_argument("--reference", help="reference label map on the volume's grid")
    run.add_argument("--label", type=int, metavar="K", help="a classifier's true class (its class index)")
    run.add_argument("--task", choices=TASKS, help="what the network does (default: as model.json says, else "
                                                   "detected from the outputs' shape and reported)")
    _add_attack_arguments(run, default_epsilons=None)
    run.add_argument("--output-activation", choices=ACTIVATIONS,
                     help="what the network outputs are (default: as model.json or the bundle says, else "
                          "detected from the outputs and reported)")
    run.add_argument("--out", required=True, help="results folder (must not exist or be empty)")
    run.add_argument("--folds", nargs="+", metavar="K",
                     help="nnU-Net model: the folds to ensemble (default: every fold_K with checkpoint_final.pth)")
    run.add_argument("--no-mirroring", dest="mirroring", action="store_false",
                     help="nnU-Net model: without test-time mirroring (nnU-Net mirrors by default)")
    run.add_argument("--skip-untwinned", action="store_true",
                     help="MONAI bundle: leave out preprocessing transforms that have no differentiable twin "
                          "(reported: the attacked pipeline then differs from the bundle's) instead of refusing")
    _add_model_arguments(run, trust=True)
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo", help="the same on the embedded MNI152 sample with the demo network", formatter_class=HelpFormatter,
        description="'medadv run' on the embedded sample (the MNI152 T1 at 2 mm, with its CSF, grey and white matter "
                    "labels as the reference) with the built-in demo network (a MONAI UNet trained on it by "
                    "'medadv train'). Default: pgd, 10 steps, seed 0, at epsilons {}.\n".format(
                        " ".join("{:g}".format(e) for e in DEMO_EPSILONS)) + RESULTS_TEXT,
        epilog=_examples("medadv demo --out demo-results",
                         "medadv demo --attack fgsm --epsilon 0.01 --out demo-fgsm",
                         "medadv demo --attack fgsm --epsilon 0.02 --region-labels 1 --out csf-only",
                         "medadv demo --corruption ghosting --severity 1 3 5 --out demo-ghosting",
                         "medadv demo --task classification --attack deepfool --epsilon 0.05 0.1 --out demo-deepfool"))
    _add_attack_arguments(demo, default_epsilons=DEMO_EPSILONS)
    demo.add_argument("--task", choices=TASKS, default="segmentation",
                      help="classification: the demo classifier on a held-out axial slice of the sample (true "
                           "class: lateral ventricles)")
    demo.add_argument("--out", required=True, help="results folder (must not exist or be empty)")
    _add_model_arguments(demo, trust=False)
    demo.set_defaults(handler=_demo)

    attacks = commands.add_parser(
        "attacks", help="list every attack and corruption with its parameters and their defaults",
        formatter_class=HelpFormatter,
        description="Every attack and every corruption: what it does, its parameters and their defaults. Each "
                    "parameter is an option of 'medadv run' and 'medadv demo' (--steps 20, --target-mode swap) or "
                    "--param KEY=VALUE, and a 'params' entry of a bench study.",
        epilog=_examples("medadv attacks", "medadv attacks | less"))
    attacks.set_defaults(handler=_list_attacks)

    train = commands.add_parser(
        "train", help="train the demo network on the embedded sample (reproducible)", formatter_class=HelpFormatter,
        description="Train the demo network's recipe (strong augmentation of the one embedded subject) and write "
                    "model.json, model.pt and training.json; the folder is a model for --model of 'medadv run' and "
                    "a network of 'medadv bench'. Seeded (MONAI's set_determinism and the augmentation): the same "
                    "seed trains the same network on the same machine.",
        epilog=_examples("medadv train --out my-unet",
                         "medadv train --out my-segresnet --architecture segresnet --iterations 1000 --seed 1",
                         "medadv bench --networks demo my-segresnet --cases heldout:3 --attacks fgsm --epsilons 0.01 "
                         "--out compare"))
    train.add_argument("--out", required=True, help="folder for model.json, model.pt and training.json")
    train.add_argument("--iterations", type=positive_int,
                       help="training iterations (default 3000; 120 with --task classification)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initialisation and augmentation (default 0)")
    train.add_argument("--architecture", default="unet", choices=("unet", "segresnet", "attentionunet", "slicewise2d"),
                       help="network family, same recipe (default unet: the demo network)")
    train.add_argument("--name", help="network name in model.json (default demo-ARCHITECTURE)")
    train.add_argument("--task", default="segmentation", choices=("segmentation", "classification"),
                       help="classification: the demo classifier (axial level of MNI152 slices; its own recipe, "
                            "default 120 iterations; --architecture does not apply)")
    train.set_defaults(handler=_train)

    from .viewer.serve import add_view_command  # the browser viewer: `medadv view DIR` (handler in viewer/serve.py)
    view = add_view_command(commands)
    view.formatter_class = HelpFormatter
    view.epilog = _examples("medadv view demo-results                 # then open http://127.0.0.1:8080/",
                            "medadv view results/scene.mrb --port 0   # any free port",
                            "medadv view results --model my-net/      # probes run from the page use my-net")
    _add_bench_command(commands)
    return parser


def _add_bench_command(commands):
    """``medadv bench STUDY.json``: the parser here (it imports no torch), the command in study/command.py."""
    bench = commands.add_parser(
        "bench", help="compare networks on cases under attacks and corruptions (resumable grid, local workers or a "
                      "Dask cluster)", formatter_class=HelpFormatter,
        description="Run every network on every case under every probe at every strength (one cell each) and put "
                    "them side by side: results.csv, summary.csv (clean Dice, robustness score, ROOD-MRI "
                    "degradation), figures/, report.html and study.json (the resolved study, the SHA-256 of the "
                    "model and case files, the versions). Cells are stored in OUT/cells/ as they finish: the same "
                    "command again computes only the missing ones. Give a study file (JSON or YAML: networks, "
                    "cases, probes, seed) or the lists below.",
        epilog=_examples("medadv bench studies/demo-networks.json --out bench-demo --workers 2",
                         "medadv bench --networks demo-unet my-net/ --cases cases/ heldout:3 --attacks fgsm pgd "
                         "--epsilons 0.005 0.01 --steps 5 --out mine",
                         "medadv bench --networks demo-unet --cases sample --corruptions rician_noise "
                         "--severities 1 3 5 --out noise",
                         "medadv bench studies/demo-networks.json --out bench-demo --scheduler tcp://host:8786"))
    bench.add_argument("study", nargs="?", help="study file (JSON or YAML) with networks, cases and probes")
    bench.add_argument("--out", required=True, help="study folder (cells/ kept: run again to resume)")
    bench.add_argument("--networks", nargs="+", default=[], help="built-in names or model folders")
    bench.add_argument("--cases", nargs="+", default=[],
                       help="volume files, folders of NIfTI/NRRD pairs (NAME + NAME_seg), 'sample', or heldout:N")
    bench.add_argument("--attacks", nargs="+", default=[], help="attacks, each at every --epsilons")
    bench.add_argument("--epsilons", nargs="+", type=float, default=[], metavar="E",
                       help="budgets of the --attacks as fractions of the intensity range (0 < e < 1); needed with "
                            "--attacks")
    bench.add_argument("--corruptions", nargs="+", default=[], help="corruptions, each at every --severities")
    bench.add_argument("--severities", nargs="+", type=int, default=[], metavar="S",
                       help="severities 1 to 5 of the --corruptions; needed with --corruptions")
    bench.add_argument("--steps", type=int, help="steps of the iterative attacks")
    bench.add_argument("--seed", type=int, help="seed of the probes' random draws (default 0)")
    bench.add_argument("--workers", type=positive_int, default=1, help="local worker processes (default 1)")
    bench.add_argument("--scheduler", help="Dask distributed scheduler address (tcp://host:8786) to run the cells on "
                                           "(needs pip install \"medadvrobustness[dask]\")")
    bench.add_argument("--write-cases", metavar="DIR", help="also write the held-out cases as NIfTI pairs to DIR")
    bench.add_argument("--device", default="cpu",
                       help="where the networks run: cpu (default), cuda or cuda:N (cells keyed apart from the CPU's)")
    bench.add_argument("-q", "--quiet", action="store_true",
                       help="no progress on stderr (the summary on stdout still shows)")
    bench.set_defaults(handler=_bench)


def _bench(args):
    if args.scheduler:
        try:
            import distributed  # noqa: F401  (only --scheduler needs it: the dask extra)
        except ImportError:
            raise InputError(MISSING_DASK)
    from .study import command
    return command._bench(args)


def probe_options():
    """Every parameter of any probe of the registry, as ``(flag, parameter, {probe name: its default})``: each one
    given on the command line becomes a parameter of the probe (a probe that does not take it refuses it). The
    help is the default attack's (pgd) where it takes the parameter."""
    return [("--" + parameter.name.replace("_", "-"), parameter, dict(defaults))
            for parameter, defaults in PROBE_OPTIONS]


def _option_help(parameter, defaults):
    """The parameter's help, then its default: the most common one, and the probes that differ."""
    texts = {name: value_text(value) for name, value in defaults.items()}
    common = max(sorted(set(texts.values())), key=list(texts.values()).count)
    others = ", ".join("{}: {}".format(name, text) for name, text in sorted(texts.items()) if text != common)
    who = "every probe" if len(defaults) == len(ATTACK_NAMES) + len(CORRUPTION_NAMES) else "/".join(sorted(defaults))
    return "{} ({}; default {}{})".format(parameter.help, who, common, "; " + others if others else "")


MODEL_HELP = ("'demo'; a model folder with model.json (or that file: an architecture from monai.networks.nets with "
              "its args plus a state-dict checkpoint, or TorchScript weights, with the preprocessing); a MONAI "
              "bundle folder or .zip (configs/inference.json, models/model.pt or model.ts); a MONAI Auto3DSeg model "
              "folder or model.pt (as MONAIAuto3DSeg keeps them); an nnU-Net v2 trained model folder "
              "(TRAINER__PLANS__CONFIGURATION with plans.json, dataset.json, fold_K/checkpoint_final.pth, as "
              "TotalSegmentator and SlicerNNUNet keep them); or a TorchScript file")


def _add_model_arguments(parser, trust):
    """Where the network runs, and (``run``) whether a checkpoint that needs arbitrary unpickling may load; the
    output options of ``run`` and ``demo``."""
    parser.add_argument("--unstable-at", type=float, metavar="S",
                        help="the scene's 'unstable at <= S' segmentation: per clean label the voxels whose label "
                             "changes at or below this strength (default: the middle strength of the sweep)")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress on stderr (errors and the summary on stdout still show)")
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda or cuda:N; an error if CUDA is not available")
    parser.add_argument("--memory-budget", type=memory_size, metavar="SIZE",
                        help="windowed networks: memory for the windows' kept forward graphs, e.g. 8G or 512M "
                             "(default: half the available memory); too small for two windows: every window is "
                             "recomputed")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: float16 autocast on CUDA, bfloat16 on CPU")
    if trust:
        parser.add_argument("--trust-checkpoint", action="store_true",
                            help="allow checkpoints (and bundle configs) that need arbitrary unpickling or run code: "
                                 "only for files from a source you trust")


def _add_attack_arguments(parser, default_epsilons):
    parser.add_argument("--attack", choices=ATTACK_NAMES,
                        help="the attack (default pgd); `medadv attacks` lists them with their parameters")
    parser.add_argument("--epsilon", type=float, nargs="+",
                        help="budgets as fractions of the intensity range (0 < e < 1){}".format(
                            "" if default_epsilons is None else
                            " (default {})".format(" ".join("{:g}".format(e) for e in default_epsilons))))
    parser.add_argument("--corruption", choices=CORRUPTION_NAMES,
                        help="a corruption instead of an attack (seeded by --seed)")
    parser.add_argument("--severity", type=int, nargs="+", choices=SEVERITIES,
                        help="corruption severities (default 1 2 3 4 5)")
    parser.set_defaults(default_epsilons=default_epsilons)
    for flag, parameter, names in probe_options():
        dest, help_text = "param_" + parameter.name, _option_help(parameter, names)
        if parameter.kind is bool:
            parser.add_argument(flag, dest=dest, action="store_true", default=None, help=help_text)
            parser.add_argument("--no-" + flag[2:], dest=dest, action="store_false", help="not " + flag)
        elif parameter.choices:
            parser.add_argument(flag, dest=dest, choices=parameter.choices, help=help_text)
        else:
            parser.add_argument(flag, dest=dest, type=parameter.kind, metavar=parameter.name.upper(), help=help_text)
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="any attack parameter, repeatable (e.g. --param restart_criterion=loss)")
    parser.add_argument("--region", help="label map on the volume's grid: the attack (or an intensity corruption) "
                                         "changes only its non-zero voxels (or those of --region-labels)")
    parser.add_argument("--region-labels", type=int, nargs="+", metavar="LABEL",
                        help="change only voxels with these labels of --region (without --region: of the "
                             "reference), e.g. one structure")


def probe_from_args(args):
    """The probe and its strengths: ``--corruption`` at ``--severity``, else ``--attack`` at ``--epsilon``."""
    from .probes.registry import make_probe, probe_class
    params = _given_parameters(args)
    if args.corruption is None:
        if args.severity:
            raise InputError("--severity goes with --corruption; attacks take --epsilon")
        epsilons = args.epsilon or args.default_epsilons
        if not epsilons:
            raise InputError("give --epsilon (one or more budgets) for an attack, or --corruption")
        return make_probe(args.attack or "pgd", **params), epsilons
    taken = {parameter.name for parameter in probe_class(args.corruption).parameters()}
    refused = ["--" + key.replace("_", "-") for key in params if key not in taken]
    if args.attack or args.epsilon or refused:
        raise InputError("--corruption takes --severity, {}, --region, --region-labels and --param only; --attack, "
                         "--epsilon and {} are attack options".format(", ".join("--" + key for key in sorted(taken)),
                                                                      ", ".join(refused) or "the other options"))
    return make_probe(args.corruption, **params), args.severity or list(SEVERITIES)


def _given_parameters(args):
    """The probe parameters the command line gives: the options and the ``--param`` pairs."""
    params = {parameter.name: getattr(args, "param_" + parameter.name) for _flag, parameter, _names in probe_options()
              if getattr(args, "param_" + parameter.name) is not None}
    for item in args.param:
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise InputError("--param takes KEY=VALUE, got {!r}".format(item))
        params[key.strip().replace("-", "_")] = value
    return params


def _run(args):
    return _attack(args.volume, args.model, args.reference, args, args.output_activation)


def _demo(args):
    from .sample import SAMPLE_LABELS, SAMPLE_SLICE, SAMPLE_SLICE_CLASS, SAMPLE_VOLUME
    if args.task == "classification":
        args.label = SAMPLE_SLICE_CLASS
        return _attack(SAMPLE_SLICE, "demo-classifier", None, args, None)
    return _attack(SAMPLE_VOLUME, "demo", SAMPLE_LABELS, args, None)


def _attack(volume, model, reference, args, output_activation):
    from .pipeline import run_on_files
    probe, strengths = probe_from_args(args)
    start = time.time()
    if args.unstable_at is not None and not (math.isfinite(args.unstable_at) and args.unstable_at > 0):
        raise InputError("--unstable-at must be a positive strength, got {}".format(args.unstable_at))
    progress = None if args.quiet else Progress(sys.stderr)
    result = run_on_files(volume, model, probe, strengths, args.out, reference, output_activation=output_activation,
                          progress=progress, trust_checkpoint=getattr(args, "trust_checkpoint", False),
                          device=args.device, amp=args.amp, region_path=args.region,
                          region_labels=args.region_labels, folds=getattr(args, "folds", None),
                          mirroring=getattr(args, "mirroring", True),
                          skip_untwinned=getattr(args, "skip_untwinned", False),
                          command=getattr(args, "command_line", None), unstable_at=args.unstable_at,
                          memory_budget=args.memory_budget, label=getattr(args, "label", None),
                          task=getattr(args, "task", None))
    if progress is not None:
        progress.close()
    print(summary(result, time.time() - start))
    return 0


def _list_attacks(args):
    from .probes.registry import describe_probes
    print(describe_probes(), end="")
    return 0


def _train(args):
    import logging
    import warnings
    from .training import train
    logging.getLogger("monai").setLevel(logging.ERROR)  # e.g. that an optional DICOM decoder is not installed
    with warnings.catch_warnings():  # MONAI's and torch's notices of API changes: for their users' code, not ours
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(monai|torch)\b")
        if args.task == "classification":
            from .classification_training import train as train_classifier
            train_classifier(args.out, iterations=args.iterations or 120, seed=args.seed,
                             name=args.name or "demo-classifier")
        else:
            train(args.out, iterations=args.iterations or 3000, seed=args.seed, architecture=args.architecture,
                  name=args.name or "demo-" + args.architecture)
    return 0


def summary(result, seconds):
    """The clean Dice per label, then per strength the mean Dice, HD95, SSIM and PSNR, as text (a classifier's:
    :func:`classification_summary`)."""
    if getattr(result, "task", "segmentation") == "classification":
        return classification_summary(result, seconds)
    key, against = result.strength_name, result.against
    kind = "attack" if key == "epsilon" else "corruption"
    lines = ["{} on {} ({} {}), {:.0f} s".format(result.model_name, result.volume.name, result.probe_name, kind,
                                                 seconds)]
    if result.reference is not None:
        clean = ["{} {:.3f}".format(row["label"], row["dice_reference"]) for row in result.rows if row[key] == 0]
        lines.append("clean Dice against the reference: " + ", ".join(clean))
    lines.append("{:>10}  {:>10}  {:>9}  {:>6}  {:>8}".format(key, "mean Dice", "HD95 mm", "SSIM", "PSNR dB"))
    for outcome in result.outcomes:
        row = next(r for r in result.rows if r[key] == outcome.strength and r["label"] == "mean")
        lines.append("{:>10g}  {:>10.3f}  {:>9}  {:>6.3f}  {:>8}".format(
            outcome.strength, row["dice_" + against], _number(row["hd95_" + against]), row["ssim"],
            _number(row["psnr"])))
    rood = result.rood_summary()
    if rood is not None:
        lines.append("ROOD-MRI summary of the mean Dice (alpha 2/3): weighted mean {:.3f}, degradation {:.3f}, "
                     "overall {:.3f}".format(rood["weighted_mean"], rood["degradation"], rood["overall"]))
    return "\n".join(lines + fragility_lines(result))


def classification_summary(result, seconds):
    """Per strength the predicted class, its probability, the true class's, whether it flipped, SSIM and PSNR."""
    key = result.strength_name
    lines = ["{} on {} ({} {}, classification), {:.0f} s".format(
        result.model_name, result.volume.name, result.probe_name, "attack" if key == "epsilon" else "corruption",
        seconds)]
    width = max([len("predicted")] + [len(str(row["predicted_name"])) for row in result.rows])
    lines.append("{:>10}  {:<{width}} {:>10}  {:>10}  {:>7}  {:>6}  {:>8}".format(
        key, "predicted", "confidence", "p(label)", "flipped", "SSIM", "PSNR dB", width=width))
    for row in result.rows:
        lines.append("{:>10g}  {:<{width}} {:>10.3f}  {:>10}  {:>7}  {:>6.3f}  {:>8}".format(
            row[key], str(row["predicted_name"]), row["confidence"],
            "" if row.get("label_probability") is None else "{:.3f}".format(row["label_probability"]),
            "yes" if row["flipped"] else "no", row["ssim"], _number(row["psnr"]), width=width))
    minimal = [row for row in result.rows if row.get("minimal_linf_fraction") is not None]
    if minimal:
        lines.append("smallest perturbation that flips (fraction of the range): L-inf {:.4g}, L2 {:.4g}".format(
            minimal[-1]["minimal_linf_fraction"], minimal[-1]["minimal_l2_fraction"]))
    return "\n".join(lines)


def fragility_lines(result):
    """The structures by critical strength, and (with a reference) how well fragility ranks the errors."""
    from .evaluation.fragility import fragility_summary, structure_rows, summary_line
    key = "critical_" + result.strength_name
    rows = sorted(structure_rows(result), key=lambda row: (row[key] is None, row[key] or 0.0))
    lines = ["critical {} (Dice against the clean prediction below 0.9): {}".format(result.strength_name, ", ".join(
        "{} {}".format(row["label"], "never" if row[key] is None else "{:.3g}".format(row[key])) for row in rows))]
    if result.reference is not None:
        lines.append(summary_line(fragility_summary(result, result.fragility, result.reference)))
    return lines


def _number(value):
    return "" if value is None else "{:.1f}".format(value)


class Progress:
    """Progress on ``stream``: a bar with the time left on a terminal, plain ``[ 40%] message`` lines otherwise
    (a log file, a pipe). Lines before the work starts (the model report) are printed as they come."""

    WIDTH = 24

    def __init__(self, stream):
        self.stream, self.terminal = stream, stream.isatty()
        self.started, self.bar_shown = None, False

    def __call__(self, fraction, message):
        if not self.terminal:
            print("[{:3.0f}%] {}".format(100 * fraction, message), file=self.stream, flush=True)
            return
        if fraction <= 0 and not self.bar_shown:
            print(message, file=self.stream, flush=True)
            return
        now = time.monotonic()
        self.started = self.started or now
        filled = int(round(self.WIDTH * min(fraction, 1.0)))
        left = (now - self.started) * (1 - fraction) / fraction if fraction > 0 else None
        width = shutil.get_terminal_size((100, 20)).columns
        line = "[{}{}] {:3.0f}% {} {}".format("#" * filled, "." * (self.WIDTH - filled), 100 * fraction,
                                             eta_text(left), message)
        self.stream.write("\r\x1b[K" + line[:max(width - 1, 20)])
        self.stream.flush()
        self.bar_shown = True

    def close(self):
        if self.bar_shown:
            self.stream.write("\n")
            self.stream.flush()
            self.bar_shown = False


def eta_text(seconds):
    """``ETA 1:05`` (minutes:seconds; hours:minutes:seconds from an hour), ``ETA --`` before it can be estimated."""
    if seconds is None:
        return "ETA --"
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return "ETA {:d}:{:02d}:{:02d}".format(hours, minutes, rest) if hours else "ETA {:d}:{:02d}".format(minutes, rest)


def _import_uninterrupted():
    """Import VTK (made quiet) and torch with a Ctrl-C held back until both are in: an import interrupted half way
    can crash the interpreter as it exits (a segmentation fault instead of one line)."""
    held = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        _quiet_vtk()
        importlib.import_module("torch")  # every command that computes needs it; --help and --version stop before
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        _interrupt(signal.SIGINT, None)


def _quiet_vtk():
    """Keep VTK's informational messages (e.g. one line per file zipped into a .mrb) off the terminal."""
    import vtk
    vtk.vtkOutputWindow.SetInstance(vtk.vtkStringOutputWindow())


if __name__ == "__main__":
    sys.exit(main())
