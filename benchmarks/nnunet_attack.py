"""Benchmark: attack iterations through an nnU-Net v2 model, against one forward + backward of the same pipeline.

The model is the small nnU-Net shipped for the tests (Testing/Data/nnUNet: 2 mm, patch 48x56x48). Two volumes:

- ``brain``: the MNI152 1 mm T1 (197x233x189, nilearn wheel), resampled by the model to 2 mm (99x117x95);
- ``ct``: a CT-sized 512x512x300 volume of 0.8x0.8x1.5 mm (a smooth phantom inside a cylinder, zeros outside),
  78.6 M voxels, cropped to its non-zero cylinder and resampled to 225x183x183 at the network (as measured).

Each runs in its own subprocess, so its peak memory (``ru_maxrss``) is its own. In it: attack iterations (one
FGSM-style gradient step each: nnU-Net's whole pipeline forward, the gradient tile by tile, the step, the
projection), then the floor: one forward + backward of the network on every tile, one tile at a time, without
the preprocessing or the aggregation (plain autograd through all tiles at once does not fit in memory on the CT).
Iterations and floors alternate (medians; the ratio is the median of each round's). Prints seconds per iteration,
the ratio to the floor, the peak memory and the load average at the end.

    python benchmarks/nnunet_attack.py [--cases brain ct] [--mirroring] [--iterations 3]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "Testing" / "Data" / "nnUNet" / "Dataset101_MedAdvTiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
CASES = ("brain", "ct")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--mirroring", action="store_true", help="test-time mirroring (8 passes per tile)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def volume_for(case):
    import numpy as np
    from MedAdvRobustnessLib.networks.volume import Volume
    if case == "brain":
        import nibabel as nib
        import nilearn.datasets
        image = nib.load(str(Path(nilearn.datasets.__file__).parent / "data" /
                             "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))
        return Volume.from_array(np.asarray(image.dataobj, dtype=np.float32), image.affine, "MNI152 T1 1 mm")
    i, j, k = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in (512, 512, 300)], indexing="ij")
    inside = (i ** 2 + j ** 2) < 0.8
    array = np.where(inside, 40.0 + 30.0 * np.sin(6 * i) * np.cos(5 * j) + 20.0 * k, 0.0).astype(np.float32)
    del i, j, k
    return Volume.from_array(array, np.diag([0.8, 0.8, 1.5, 1.0]), "CT-sized phantom")


def child(case, mirroring, iterations):
    import torch
    from MedAdvRobustnessLib.networks.models import load_model
    model = load_model(MODEL, folds=["0"], mirroring=mirroring)
    volume = volume_for(case)
    x = volume.as_tensor()
    low, high = volume.intensity_range
    epsilon = 0.01 * (high - low)

    def loss(outputs):
        return outputs[:, 1:].sum()

    with model.on_grid(volume):
        with torch.no_grad():
            network_input, plan = model.prepare(x)
        model.gradient_mode = "windowed"
        times, floors, probed = [], [], x.clone()
        for _ in range(iterations):  # alternating, so that a change of the machine's load hits both alike
            start = time.perf_counter()
            _, gradient, _ = model.loss_and_gradient(probed, loss)
            probed = torch.max(torch.min(probed + epsilon * gradient.sign(), x + epsilon), x - epsilon)
            times.append(time.perf_counter() - start)
            floors.append(tile_floor(model, network_input))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(json.dumps({"case": case, "voxels": int(x.numel()), "network_size": list(plan["network_size"]),
                      "floor_s": statistics.median(floors), "iteration_s": statistics.median(times),
                      "ratio": statistics.median(t / f for t, f in zip(times, floors)), "peak_gib": peak,
                      "load": os.getloadavg()[0]}))


def tile_floor(model, inputs):
    """Seconds for one forward + backward of the network on every tile, one tile at a time: the least any
    gradient through this pipeline can cost (no preprocessing, no aggregation)."""
    import torch
    from MedAdvRobustnessLib.networks.windowed import window_plan
    plan = window_plan(inputs.shape[2:], model.description.window)
    padded = plan.pad_input(inputs)
    start = time.perf_counter()
    for window_slice in plan.slices:
        tile = padded[(slice(None), slice(None)) + window_slice].clone().requires_grad_(True)
        outputs = model.run_network(tile)
        torch.autograd.grad(outputs.sum(), tile)
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args.child, args.mirroring, args.iterations)
    print("nnU-Net model {} (fold 0, mirroring {})".format(MODEL.parent.name, "on" if args.mirroring else "off"))
    print("{:<7} {:>12} {:>16} {:>10} {:>12} {:>8} {:>10} {:>6}".format(
        "case", "voxels", "network grid", "floor s", "iteration s", "ratio", "peak GiB", "load"))
    for case in args.cases:
        command = [sys.executable, __file__, "--child", case, "--iterations", str(args.iterations)]
        command += ["--mirroring"] if args.mirroring else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print("{}: exit status {} {}".format(case, done.returncode, done.stderr[-2000:]), file=sys.stderr)
            return 1
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print("{:<7} {:>12,} {:>16} {:>10.1f} {:>12.1f} {:>8.2f} {:>10.2f} {:>6.1f}".format(
            row["case"], row["voxels"], "x".join(str(n) for n in row["network_size"]), row["floor_s"],
            row["iteration_s"], row["ratio"], row["peak_gib"], row["load"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
