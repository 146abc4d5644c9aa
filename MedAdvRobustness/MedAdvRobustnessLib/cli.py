"""``medadv``: attack a segmentation network on a volume file, headless, with Slicer's MRML core."""
import argparse
import sys
import time

from .attacks import ATTACKS
from .errors import InputError
from .outputs import ACTIVATIONS

DEMO_EPSILONS = (0.005, 0.01, 0.02, 0.04)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_vtk()
    try:
        return args.handler(args)
    except InputError as error:
        print("medadv: error: {}".format(error), file=sys.stderr)
        return 2


def build_parser():
    parser = argparse.ArgumentParser(prog="medadv", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="attack a network on a volume and write the results folder")
    run.add_argument("--volume", required=True, help="input volume (NIfTI, NRRD, ... any file Slicer reads)")
    run.add_argument("--model", required=True, help="'demo', a model folder with model.json, or a TorchScript file")
    run.add_argument("--reference", help="reference label map on the volume's grid")
    _add_attack_arguments(run, default_epsilons=None)
    run.add_argument("--output-activation", choices=ACTIVATIONS,
                     help="what the network outputs are (default: from model.json, else logits)")
    run.add_argument("--out", required=True, help="results folder (must not exist or be empty)")
    run.set_defaults(handler=_run)

    demo = commands.add_parser("demo", help="the same on the embedded MNI152 sample with the demo network")
    _add_attack_arguments(demo, default_epsilons=DEMO_EPSILONS)
    demo.add_argument("--out", required=True, help="results folder (must not exist or be empty)")
    demo.set_defaults(handler=_demo)

    train = commands.add_parser("train", help="train the demo network on the embedded sample (reproducible)")
    train.add_argument("--out", required=True, help="folder for model.json, model.pt and training.json")
    train.add_argument("--iterations", type=int, default=3000)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(handler=_train)
    return parser


def _add_attack_arguments(parser, default_epsilons):
    parser.add_argument("--attack", choices=sorted(ATTACKS), default="pgd")
    parser.add_argument("--epsilon", type=float, nargs="+", required=default_epsilons is None,
                        default=list(default_epsilons or []),
                        help="L-infinity budgets as fractions of the intensity range (0 < e < 1)")
    parser.add_argument("--steps", type=int, default=10, help="PGD iterations (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of PGD's random start (default 0)")


def _run(args):
    return _attack(args.volume, args.model, args.reference, args, args.output_activation)


def _demo(args):
    from .sample import SAMPLE_LABELS, SAMPLE_VOLUME
    return _attack(SAMPLE_VOLUME, "demo", SAMPLE_LABELS, args, None)


def _attack(volume, model, reference, args, output_activation):
    from .pipeline import run_on_files
    start = time.time()
    result = run_on_files(volume, model, args.attack, args.epsilon, args.out, reference, args.steps, args.seed,
                          output_activation, progress=_print_progress)
    print(summary(result, time.time() - start))
    return 0


def _train(args):
    from .training import train
    train(args.out, iterations=args.iterations, seed=args.seed)
    return 0


def summary(result, seconds):
    """The clean Dice per label and the mean Dice at each epsilon, as text."""
    against = "reference" if result.reference is not None else "clean"
    lines = ["{} on {} ({} attack), {:.0f} s".format(result.model_name, result.volume.name, result.attack_name,
                                                      seconds)]
    if result.reference is not None:
        clean = ["{} {:.3f}".format(row["label"], row["dice_reference"]) for row in result.rows if row["epsilon"] == 0]
        lines.append("clean Dice against the reference: " + ", ".join(clean))
    lines.append("{:>10}  {:>12}  {:>8}".format("epsilon", "mean Dice", "PSNR dB"))
    for outcome in result.outcomes:
        row = next(r for r in result.rows if r["epsilon"] == outcome.epsilon and r["label"] == "mean")
        psnr = "" if row["psnr"] is None else "{:.1f}".format(row["psnr"])
        lines.append("{:>10g}  {:>12.3f}  {:>8}".format(outcome.epsilon, row["dice_" + against], psnr))
    return "\n".join(lines)


def _print_progress(fraction, message):
    print("[{:3.0f}%] {}".format(100 * fraction, message), file=sys.stderr, flush=True)


def _quiet_vtk():
    """Keep VTK's informational messages (e.g. one line per file zipped into a .mrb) off the terminal."""
    import vtk
    vtk.vtkOutputWindow.SetInstance(vtk.vtkStringOutputWindow())


if __name__ == "__main__":
    sys.exit(main())
