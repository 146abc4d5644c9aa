"""``medadv``: attack a segmentation network on a volume file, headless, with Slicer's MRML core."""
import argparse
import os
import signal
import sys
import time

from .errors import InputError
from .networks.outputs import ACTIVATIONS
from .probes.attacks import ATTACKS
from .probes.corruptions import CORRUPTIONS, SEVERITIES
from .probes.parameters import value_text
from .probes.registry import describe_probes, make_probe, probe_class, probe_names, probe_parameters

DEMO_EPSILONS = (0.005, 0.01, 0.02, 0.04)


class Terminated(Exception):
    """SIGTERM, raised where the process is, so that what it staged is removed as on Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_vtk()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.handler(args)
    except InputError as error:
        return _error(str(error), 2)
    except KeyboardInterrupt:
        return _error("interrupted (Ctrl-C); nothing was written", 130, "medadv: ")
    except Terminated:
        return _error("terminated (SIGTERM); nothing was written", 143, "medadv: ")
    except BrokenPipeError:  # the reader of the output went away (`medadv attacks | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as error:  # the system refused a file or folder (read-only, full disk, permissions)
        where = " {}".format(error.filename) if error.filename else ""
        return _error("cannot write or read{}: {}".format(where, error.strerror or error), 2)


def _error(message, status, prefix="medadv: error: "):
    print(prefix + message, file=sys.stderr)
    return status


def build_parser():
    parser = argparse.ArgumentParser(prog="medadv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="attack a network on a volume and write the results folder")
    run.add_argument("--volume", required=True, help="input volume (NIfTI, NRRD, ... any file Slicer reads)")
    run.add_argument("--model", required=True, help=MODEL_HELP)
    run.add_argument("--reference", help="reference label map on the volume's grid")
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

    demo = commands.add_parser("demo", help="the same on the embedded MNI152 sample with the demo network")
    _add_attack_arguments(demo, default_epsilons=DEMO_EPSILONS)
    demo.add_argument("--out", required=True, help="results folder (must not exist or be empty)")
    _add_model_arguments(demo, trust=False)
    demo.set_defaults(handler=_demo)

    attacks = commands.add_parser("attacks", help="list every attack and corruption with its parameters and their "
                                                  "defaults")
    attacks.set_defaults(handler=_list_attacks)

    train = commands.add_parser("train", help="train the demo network on the embedded sample (reproducible)")
    train.add_argument("--out", required=True, help="folder for model.json, model.pt and training.json")
    train.add_argument("--iterations", type=int, default=3000)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--architecture", default="unet", choices=("unet", "segresnet", "attentionunet", "slicewise2d"),
                       help="network family, same recipe (default unet: the demo network)")
    train.add_argument("--name", help="network name in model.json (default demo-ARCHITECTURE)")
    train.set_defaults(handler=_train)

    from .viewer.serve import add_view_command  # the browser viewer: `medadv view DIR` (handler in viewer/serve.py)
    add_view_command(commands)
    from .study.command import add_bench_command; add_bench_command(commands)  # `medadv bench STUDY.json`
    return parser


def probe_options():
    """Every parameter of any probe of the registry, as ``(flag, parameter, {probe name: its default})``: each one
    given on the command line becomes a parameter of the probe (a probe that does not take it refuses it). The
    help is the default attack's (pgd) where it takes the parameter."""
    takers = {}
    for name in sorted(probe_names(), key=lambda name: name != "pgd"):
        for parameter in probe_parameters(name):
            takers.setdefault(parameter.name, (parameter, {}))[1][name] = parameter.default
    return [("--" + key.replace("_", "-"), parameter, defaults) for key, (parameter, defaults) in takers.items()]


def _option_help(parameter, defaults):
    """The parameter's help, then its default: the most common one, and the probes that differ."""
    texts = {name: value_text(value) for name, value in defaults.items()}
    common = max(sorted(set(texts.values())), key=list(texts.values()).count)
    others = ", ".join("{}: {}".format(name, text) for name, text in sorted(texts.items()) if text != common)
    who = "every probe" if len(defaults) == len(probe_names()) else "/".join(sorted(defaults))
    return "{} ({}; default {}{})".format(parameter.help, who, common, "; " + others if others else "")


MODEL_HELP = ("'demo'; a model folder with model.json (or that file: an architecture from monai.networks.nets with "
              "its args plus a state-dict checkpoint, or TorchScript weights, with the preprocessing); a MONAI "
              "bundle folder or .zip (configs/inference.json, models/model.pt or model.ts); a MONAI Auto3DSeg model "
              "folder or model.pt (as MONAIAuto3DSeg keeps them); an nnU-Net v2 trained model folder "
              "(TRAINER__PLANS__CONFIGURATION with plans.json, dataset.json, fold_K/checkpoint_final.pth, as "
              "TotalSegmentator and SlicerNNUNet keep them); or a TorchScript file")


def _add_model_arguments(parser, trust):
    """Where the network runs, and (``run``) whether a checkpoint that needs arbitrary unpickling may load."""
    parser.add_argument("--device", default="cpu",
                        help="cpu (default), cuda or cuda:N; an error if CUDA is not available")
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision: float16 autocast on CUDA, bfloat16 on CPU")
    if trust:
        parser.add_argument("--trust-checkpoint", action="store_true",
                            help="allow checkpoints (and bundle configs) that need arbitrary unpickling or run code: "
                                 "only for files from a source you trust")


def _add_attack_arguments(parser, default_epsilons):
    parser.add_argument("--attack", choices=sorted(ATTACKS),
                        help="the attack (default pgd); `medadv attacks` lists them with their parameters")
    parser.add_argument("--epsilon", type=float, nargs="+",
                        help="budgets as fractions of the intensity range (0 < e < 1){}".format(
                            "" if default_epsilons is None else
                            " (default {})".format(" ".join("{:g}".format(e) for e in default_epsilons))))
    parser.add_argument("--corruption", choices=list(CORRUPTIONS),
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
    from .sample import SAMPLE_LABELS, SAMPLE_VOLUME
    return _attack(SAMPLE_VOLUME, "demo", SAMPLE_LABELS, args, None)


def _attack(volume, model, reference, args, output_activation):
    from .pipeline import run_on_files
    probe, strengths = probe_from_args(args)
    start = time.time()
    result = run_on_files(volume, model, probe, strengths, args.out, reference, output_activation=output_activation,
                          progress=_print_progress, trust_checkpoint=getattr(args, "trust_checkpoint", False),
                          device=args.device, amp=args.amp, region_path=args.region,
                          region_labels=args.region_labels, folds=getattr(args, "folds", None),
                          mirroring=getattr(args, "mirroring", True),
                          skip_untwinned=getattr(args, "skip_untwinned", False))
    print(summary(result, time.time() - start))
    return 0


def _list_attacks(args):
    print(describe_probes(), end="")
    return 0


def _train(args):
    from .training import train
    train(args.out, iterations=args.iterations, seed=args.seed, architecture=args.architecture,
          name=args.name or "demo-" + args.architecture)
    return 0


def summary(result, seconds):
    """The clean Dice per label, then per strength the mean Dice, HD95, SSIM and PSNR, as text."""
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
    return "\n".join(lines)


def _number(value):
    return "" if value is None else "{:.1f}".format(value)


def _print_progress(fraction, message):
    print("[{:3.0f}%] {}".format(100 * fraction, message), file=sys.stderr, flush=True)


def _quiet_vtk():
    """Keep VTK's informational messages (e.g. one line per file zipped into a .mrb) off the terminal."""
    import vtk
    vtk.vtkOutputWindow.SetInstance(vtk.vtkStringOutputWindow())


if __name__ == "__main__":
    sys.exit(main())
