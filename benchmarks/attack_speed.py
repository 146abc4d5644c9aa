"""Benchmark: one PGD iteration of medadv against the floor and against torchattacks' PGD, with peak memory.

Two cases, each measured in its own subprocess (so that its peak memory is its own):

- ``demo``: the demo network on the embedded 2 mm sample (one 96^3 window). Floor: one forward + one backward
  of the attacked pipeline (``model(x)`` with autograd, intensity percentiles included, cross-entropy; "floor,
  conv": the same with the stride-1 convolutions' input gradients taken as forward convolutions, as ours); ours:
  ``PGD`` L-infinity; theirs: ``torchattacks.PGD`` on the same model seen through [0, 1] inputs. Rounds
  alternate floor, ours and theirs, so all three see the same machine load; medians of the rounds.
- ``windowed``: the demo UNet on the 1 mm MNI152 T1 (197x233x189, from the nilearn wheel) in 96^3 windows
  (overlap 0.25, 27 windows). Floor: one forward + backward of every window (no aggregation; "conv": with the
  stride-1 convolutions' input gradients as forward convolutions, as ours). One subprocess per
  memory budget: all windows kept, about half kept, room for one window only (every window recomputed), and
  torchattacks (autograd through MONAI's sliding window); each alternates its iterations with the floor (no
  warm-up round: the first round includes what a first iteration costs).

Peak memory: above what the process held after its setup (CPU: the resident set, its high-water mark reset
through /proc/self/clear_refs before each measured method; CUDA: ``torch.cuda.max_memory_allocated``).
Also prints, for the demo, a PGD sweep of 3 strengths one by one and as one batch (B = 3, ``batch_strengths``).

    python benchmarks/attack_speed.py [--device cuda] [--cases demo windowed] [--rounds 3] [--steps 5]
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "MedAdvRobustness"))
BUDGETS = ("all", "half", "one", "torchattacks")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--cases", nargs="+", choices=("demo", "windowed"), default=["demo", "windowed"])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per method (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="demo: PGD iterations per round (default 5)")
    parser.add_argument("--budgets", nargs="+", choices=BUDGETS, default=list(BUDGETS))
    parser.add_argument("--roi", type=int, default=96, help="windowed: window edge in voxels (default 96)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- memory ----------------------------------------------------------------------------------------------------

def _status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device):
    """Start counting the peak from now; returns what is held now (MB)."""
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    return _status_mb("VmRSS")


def peak(device):
    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _status_mb("VmHWM")


def synchronize(device):
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device, function):
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


# --- what is measured --------------------------------------------------------------------------------------------

class UnitRange:
    """The model seen through inputs scaled to [0, 1], as torchattacks requires."""

    @staticmethod
    def wrap(model, low, high):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, inputs):
                return self.model(low + inputs * (high - low))

        return Wrapped().eval()


def pipeline_forward_backward(model, volume, labels, convolutions=False):
    """The floor of a whole-volume network: one forward + one backward of the attacked pipeline by PyTorch's
    autograd (``convolutions``: with the stride-1 convolutions' input gradients as forward convolutions)."""
    import contextlib
    import torch
    from MedAdvRobustnessLib.networks.convolutions import input_gradient_convolutions
    from MedAdvRobustnessLib.networks.outputs import voxel_loss
    point = volume.detach().clone().requires_grad_(True)
    swap = input_gradient_convolutions(model.network, model.device) if convolutions else contextlib.nullcontext()
    with swap:
        loss = voxel_loss(model(point), labels, model.activation).mean()
        gradient, = torch.autograd.grad(loss, point)
    return gradient


def windows_forward_backward(model, volume, plan, convolutions=False):
    """The floor of a windowed network: forward and backward of every window once (no aggregation), by PyTorch's
    autograd (``convolutions``: with the stride-1 convolutions' input gradients as forward convolutions)."""
    import contextlib
    import torch
    from MedAdvRobustnessLib.networks.convolutions import input_gradient_convolutions
    with torch.no_grad():
        inputs, _ = model.prepare(volume)
    padded = plan.pad_input(inputs)
    swap = input_gradient_convolutions(model.network, model.device) if convolutions else contextlib.nullcontext()
    with swap:
        for window_slice in plan.slices:
            window = padded[(slice(None), slice(None)) + window_slice].clone().requires_grad_(True)
            outputs = model.run_network(window)
            gradient, = torch.autograd.grad(outputs.float().square().mean(), window)
            del gradient, outputs


def demo_case(args):
    import nibabel as nib
    import torch
    import torchattacks
    from MedAdvRobustnessLib.networks.models import load_model
    from MedAdvRobustnessLib.probes.attacks import PGD
    from MedAdvRobustnessLib.sample import SAMPLE_VOLUME
    image = nib.as_closest_canonical(nib.load(str(SAMPLE_VOLUME)))
    model = load_model("demo", device=args.device)
    volume = torch.from_numpy(image.get_fdata(dtype="float32"))[None, None].to(model.device)
    labels = model.predict(volume)
    low, high = float(volume.min()), float(volume.max())
    fraction, steps = 0.02, args.steps
    ours = PGD(steps=steps)
    theirs = torchattacks.PGD(UnitRange.wrap(model, low, high), eps=fraction, alpha=2.5 / steps * fraction,
                              steps=steps, random_start=True)
    unit = (volume - low) / (high - low)
    methods = {
        "floor": lambda: [pipeline_forward_backward(model, volume, labels) for _ in range(steps)],
        "floor, conv": lambda: [pipeline_forward_backward(model, volume, labels, True) for _ in range(steps)],
        "ours": lambda: ours(model, volume, labels, fraction * (high - low), (low, high)),
        "torchattacks": lambda: theirs(unit, labels),
    }
    result = measure(args, methods, steps)
    result["strengths"] = strengths_at_once(args, model, image)
    result["shape"] = list(volume.shape[2:])
    return result


def strengths_at_once(args, model, image):
    """A PGD sweep's three epsilons (2 iterations each) one by one and as one batch of 3 copies (alternating
    rounds, medians): the probing of ``run_sweep`` (its clean prediction and metrics left out, alike for both)."""
    import numpy as np
    import torch
    from MedAdvRobustnessLib.evaluation.sweep import Sweep
    from MedAdvRobustnessLib.networks.volume import Volume
    from MedAdvRobustnessLib.probes.attacks import PGD
    volume = Volume.from_array(image.get_fdata(dtype=np.float32), image.affine)
    with torch.no_grad():
        clean_outputs = model(volume.as_tensor())
    epsilons, seconds = [0.01, 0.02, 0.04], {False: [], True: []}
    for _ in range(args.rounds):
        for batched in (False, True):
            sweep = Sweep(model, volume, clean_outputs, None, None, None, None, batched)
            seconds[batched].append(timed(args.device, lambda: PGD(steps=2).outcomes(sweep, epsilons,
                                                                                       lambda indices: None)))
    return {"one by one s": statistics.median(seconds[False]), "at once s": statistics.median(seconds[True])}


def windowed_case(args):
    import nibabel as nib
    import nilearn
    import torch
    import torchattacks
    from MedAdvRobustnessLib.networks.models import load_model
    from MedAdvRobustnessLib.networks.windowed import OUTPUT_BUFFERS, WindowKeeper, WindowPlan
    from MedAdvRobustnessLib.probes.attacks import PGD
    budget_name = args.child.split(":")[1]
    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    image = nib.as_closest_canonical(nib.load(str(path)))
    model = load_model("demo", device=args.device)
    model.description.spacing = None  # run at the volume's 1 mm grid: windows over the full-resolution brain
    model.description.window = dict(model.description.window, roi_size=[args.roi] * 3, overlap=0.25)
    volume = torch.from_numpy(image.get_fdata(dtype="float32"))[None, None].to(model.device)
    labels = model.predict(volume)
    low, high = float(volume.min()), float(volume.max())
    plan = WindowPlan(volume.shape[2:], model.description.window)
    windows = len(plan)
    with torch.no_grad():  # one window's graph, as the gradient measures it
        inputs, _ = model.prepare(volume)
    probe = WindowKeeper(model.run_network, 0, shared=list(model.network.parameters()))
    with torch.no_grad():
        channels = probe(plan.pad_input(inputs)[(slice(None), slice(None)) + plan.slices[0]]).shape[1]
    graph = probe.window_bytes
    reserve = OUTPUT_BUFFERS * int(torch.tensor(plan.padded_size).prod()) * channels * 4
    kept = {"all": windows, "half": windows // 2, "one": 0}.get(budget_name)
    fraction = 0.01
    if kept is None:
        theirs = torchattacks.PGD(UnitRange.wrap(model, low, high), eps=fraction, alpha=fraction, steps=1)
        unit = (volume - low) / (high - low)
        attack = lambda: theirs(unit, labels)  # noqa: E731
        budget = None
    else:  # room for the kept windows and the one being recomputed or pushed back ("one": that one only)
        budget = reserve + (kept + 1) * graph + graph // 2
        model.memory_budget = budget
        attack = lambda: PGD(steps=1)(model, volume, labels, fraction * (high - low), (low, high))  # noqa: E731
    methods = {"floor": lambda: windows_forward_backward(model, volume, plan),
               "floor, conv": lambda: windows_forward_backward(model, volume, plan, True), budget_name: attack}
    result = measure(args, methods, 1, warm_up=False)  # a round is long; its first one includes the first call
    result.update(windows=windows, budget_mb=None if budget is None else budget / 2 ** 20,
                  window_graph_mb=graph / 2 ** 20, report=model.gradient_report, shape=list(volume.shape[2:]))
    return result


def measure(args, methods, steps, warm_up=True):
    """Rounds of every method in turn: median seconds per iteration, peak memory above the setup (MB)."""
    for function in methods.values() if warm_up else ():
        function()
    seconds = {name: [] for name in methods}
    peaks = {}
    for _ in range(args.rounds):
        for name, function in methods.items():
            held = reset_peak(args.device)
            seconds[name].append(timed(args.device, function) / steps)
            peaks[name] = max(peaks.get(name, 0.0), peak(args.device) - held)
    return {"seconds": {name: statistics.median(values) for name, values in seconds.items()}, "peak_mb": peaks,
            "device": args.device}


def run_child(child, argv):
    completed = subprocess.run([sys.executable, __file__, "--child", child] + argv, capture_output=True, text=True)
    if completed.returncode != 0:
        return {"error": (completed.stderr.strip().splitlines() or ["exit {}".format(completed.returncode)])[-1]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_demo(result):
    s, memory = result["seconds"], result["peak_mb"]
    print("demo UNet on the 2 mm sample ({}), PGD L-infinity, seconds per iteration (medians)".format(
        "x".join(map(str, result["shape"]))))
    print("{:<14} {:>9} {:>9} {:>12} {:>14}".format("method", "s / iter", "/ floor", "/ torchattacks",
                                                    "peak MB above"))
    for name in ("floor", "floor, conv", "ours", "torchattacks"):
        print("{:<14} {:>9.3f} {:>9.3f} {:>12.3f} {:>14.0f}".format(name, s[name], s[name] / s["floor"],
                                                                   s[name] / s["torchattacks"], memory[name]))
    at_once = result["strengths"]
    alone, together = at_once["one by one s"], at_once["at once s"]
    print("PGD sweep of 3 epsilons (2 iterations each): one by one {:.2f} s, as one batch of 3 {:.2f} s (ratio "
          "{:.2f})".format(alone, together, together / alone))


WINDOWED_HEADER = "{:<13} {:>10} {:>7} {:>9} {:>8} {:>9} {:>9} {:>7} {:>10} {:>11} {:>11}".format(
    "gradient", "kept", "s/iter", "floor s", "/ floor", "conv s", "/ conv", "/ t.a.", "budget MB", "peak MB",
    "graph MB")


def print_windowed_row(name, result, theirs_ratio=None):
    """One row: seconds per iteration, its floor and ratio (and over torchattacks' ratio), budget, peak memory."""
    if "error" in result:
        print("{:<13} failed: {}".format(name, result["error"]), flush=True)
        return None
    s = result["seconds"]
    ratio = s[name] / s["floor"]
    report = result.get("report") or {}
    kept = "{}/{}".format(report["kept"], report["batches"]) if "kept" in report else "autograd"
    print("{:<13} {:>10} {:>7.2f} {:>9.2f} {:>8.2f} {:>9.2f} {:>9.2f} {:>7} {:>10} {:>11.0f} {:>11.0f}".format(
        name, kept, s[name], s["floor"], ratio, s["floor, conv"], s[name] / s["floor, conv"],
        "{:.2f}".format(ratio / theirs_ratio) if theirs_ratio else "-",
        "{:.0f}".format(result["budget_mb"]) if result["budget_mb"] else "-", result["peak_mb"][name],
        result["window_graph_mb"]), flush=True)
    return ratio


def windowed_rows(budgets, argv):
    """torchattacks first (its ratio to the floor is what the others are compared with), then each budget."""
    print("1 mm MNI152 T1 (197x233x189), demo UNet in 96^3 windows (overlap 0.25), one PGD iteration; each row its "
          "own process, the ratio to the floor measured in it; / t.a.: that ratio over torchattacks' ratio")
    print(WINDOWED_HEADER, flush=True)
    order = [name for name in ("torchattacks",) if name in budgets] + [n for n in budgets if n != "torchattacks"]
    theirs_ratio = None
    for name in order:
        ratio = print_windowed_row(name, run_child("windowed:" + name, argv), theirs_ratio)
        theirs_ratio = ratio if name == "torchattacks" else theirs_ratio


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        print(json.dumps(demo_case(args) if args.child == "demo" else windowed_case(args)))
        return 0
    print("device {}; peak MB: above what the process held after its setup".format(args.device), flush=True)
    if "demo" in args.cases:
        result = run_child("demo", argv)
        print("demo failed: {}".format(result["error"])) if "error" in result else print_demo(result)
        sys.stdout.flush()
    if "windowed" in args.cases:
        windowed_rows(args.budgets, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
