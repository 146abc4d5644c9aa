"""Benchmark: input gradients of a windowed network on a 1 mm brain, window by window vs naive autograd.

Attacks the MNI152 1 mm T1 template (197x233x189, shipped in the nilearn wheel) with the demo UNet run at the
volume's own 1 mm grid in 96^3 sliding windows (overlap 0.25: 27 windows). Each mode runs in its own subprocess,
so its peak memory (``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA) is its own:

- ``windowed``: PGD iterations with gradients computed window by window (``window_vjp``), every window run again
  (memory budget 0; ``benchmarks/attack_speed.py`` measures kept windows);
- ``naive``: the same PGD iterations with autograd through MONAI's whole sliding-window pass.

Then, in the same process (so under the same machine load), the floor: one forward + backward of every window
(no aggregation), the least a gradient can cost. Prints peak memory, the time per PGD iteration and its ratio to
the floor (1.0 is the floor), medians over the rounds.

    python benchmarks/windowed_gradient.py [--device cuda] [--iterations 3] [--roi 96]
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = ("windowed", "naive")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--iterations", type=int, default=3,
                        help="timed rounds (one PGD iteration, one floor pass) per mode (default 3)")
    parser.add_argument("--roi", type=int, default=96, help="window edge in voxels (default 96)")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def brain_volume():
    """The MNI152 2009 1 mm T1 template in the network convention (RAS, x y z), as a (1, 1, X, Y, Z) tensor."""
    import nibabel as nib
    import nilearn
    import torch
    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    image = nib.as_closest_canonical(nib.load(str(path)))
    return torch.from_numpy(image.get_fdata(dtype="float32"))[None, None]


def peak_memory_mb(device):
    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def synchronize(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args):
    """One mode in this process: a dict of figures."""
    import torch
    from MedAdvRobustnessLib.probes.attacks import PGD
    from MedAdvRobustnessLib.networks.models import load_model
    from MedAdvRobustnessLib.networks.windowed import WindowPlan
    if args.threads:
        torch.set_num_threads(args.threads)
    volume = brain_volume()
    model = load_model("demo", device=args.device, gradient_mode="naive" if args.child == "naive" else "windowed")
    model.memory_budget = 0  # every window run again (kept windows: benchmarks/attack_speed.py)
    model.description.spacing = None  # run at the volume's 1 mm grid: windows over the full-resolution brain
    model.description.window = dict(model.description.window, roi_size=[args.roi] * 3, overlap=args.overlap)
    labels = model.predict(volume)
    synchronize(args.device)
    if args.device.startswith("cuda"):  # what stays allocated after the setup; the peak is counted from here
        setup_mb = torch.cuda.memory_allocated() / 2 ** 20
        torch.cuda.reset_peak_memory_stats()
    else:  # the high-water mark of the setup (volume, network, one no-grad sliding-window pass)
        setup_mb = peak_memory_mb(args.device)
    low, high = float(volume.min()), float(volume.max())
    plan = WindowPlan(volume.shape[2:], model.description.window)
    iteration, floor, peak_mb = [], [], None
    for round_ in range(args.iterations):  # alternate, so that both see the same machine load
        start = time.perf_counter()
        PGD(steps=1, seed=round_)(model, volume, labels, 0.01 * (high - low), (low, high))
        synchronize(args.device)
        iteration.append(time.perf_counter() - start)
        peak_mb = peak_mb or peak_memory_mb(args.device)  # the first PGD iteration's peak
        start = time.perf_counter()
        window_forward_backward(model, volume, plan)
        synchronize(args.device)
        floor.append(time.perf_counter() - start)
    return {"mode": args.child, "seconds": statistics.median(iteration), "floor_seconds": statistics.median(floor),
            "peak_mb": peak_mb, "setup_mb": setup_mb, "windows": len(plan), "shape": list(volume.shape[2:]),
            "device": str(model.device)}


def window_forward_backward(model, volume, plan):
    """Forward and backward of every window once, with the model's preprocessing: what any gradient must do."""
    import torch
    inputs, _plan = model.prepare(volume)
    padded = plan.pad_input(inputs.detach())
    for window_slice in plan.slices:
        window = padded[(slice(None), slice(None)) + window_slice].clone().requires_grad_(True)
        outputs = model.run_network(window)
        gradient, = torch.autograd.grad(outputs.float().square().mean(), window)
        del gradient, outputs


def run_child(mode, argv):
    command = [sys.executable, __file__, "--child", mode] + argv
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"mode": mode, "error": (completed.stderr.strip().splitlines() or ["exit {}".format(
            completed.returncode)])[-1]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return 0
    memory = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak RSS"
    print("1 mm MNI152 T1 (197x233x189), demo UNet in {}^3 windows, overlap {}, device {}".format(
        args.roi, args.overlap, args.device))
    print("{:<9} {:>8} {:>22} {:>15} {:>10} {:>9} {:>7}".format("gradient", "windows", memory + " MB",
                                                                "above setup MB", "s / iter", "floor s", "ratio"),
          flush=True)
    for mode in args.modes:
        result = run_child(mode, argv)
        if "error" in result:
            print("{:<9} failed: {}".format(mode, result["error"]), flush=True)
            continue
        print("{:<9} {:>8} {:>22.0f} {:>15.0f} {:>10.2f} {:>9.2f} {:>7.2f}".format(
            mode, result["windows"], result["peak_mb"], result["peak_mb"] - result["setup_mb"], result["seconds"],
            result["floor_seconds"], result["seconds"] / result["floor_seconds"]), flush=True)
    print("s / iter: one PGD iteration (gradient, step, projection, Dice); floor s: one forward + backward of every "
          "window, same process; medians of {} rounds; ratio: s / iter over floor s (1.0 is the floor)".format(
              args.iterations))
    return 0


if __name__ == "__main__":
    sys.exit(main())
