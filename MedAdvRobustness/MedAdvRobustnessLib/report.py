"""``report.png``: clean vs attacked slices with segmentation overlays, the perturbation, the fragility map, and
the Dice curve."""
import numpy as np

from .scene.fragility import fragility_colours
from .scene.results import dice_curve_rows, outcome_title

VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def write_report(result, path):
    """Save the figure for the strongest epsilon (or severity) of ``result`` to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    attacked = result.outcomes[-1]
    clean = result.clean
    volume = result.volume
    zooms = np.linalg.norm(volume.affine[:3, :3], axis=0)
    colors = ListedColormap([label.color for label in result.labels])
    low, high = volume.intensity_range
    limit = max(float(np.abs(attacked.probed - volume.array).max()), 1e-12)

    fragility = result.fragility
    figure = plt.figure(figsize=(20, 11), constrained_layout=True)
    grid = figure.add_gridspec(3, 5, width_ratios=[1, 1, 1, 1, 1.3])
    for row, (view, axis) in enumerate(VIEWS):
        index = most_changed_slice(clean.prediction, attacked.prediction, axis, result.reference)
        aspect = _aspect(zooms, axis)
        panels = ((clean.probed, clean.prediction, "clean"),
                  (attacked.probed, attacked.prediction, outcome_title(result, attacked)))
        for column, (image, prediction, title) in enumerate(panels):
            ax = figure.add_subplot(grid[row, column])
            ax.imshow(display_slice(image, axis, index), cmap="gray", vmin=low, vmax=high, aspect=aspect)
            labels = display_slice(prediction, axis, index)
            ax.imshow(np.ma.masked_equal(labels, 0), cmap=colors, vmin=-0.5, vmax=len(result.labels) - 0.5,
                      alpha=0.45, interpolation="nearest", aspect=aspect)
            ax.set_title("{} ({} {})".format(title, view, index), fontsize=10)
            ax.axis("off")
        ax = figure.add_subplot(grid[row, 2])
        shown = ax.imshow(display_slice(attacked.probed - volume.array, axis, index), cmap="RdBu_r",
                          vmin=-limit, vmax=limit, aspect=aspect)
        ax.set_title("perturbation (intensity units)", fontsize=10)
        ax.axis("off")
        figure.colorbar(shown, ax=ax, shrink=0.8)
        _plot_fragility(figure, figure.add_subplot(grid[row, 3]), result, fragility, axis, index, aspect)
    _plot_curve(figure.add_subplot(grid[:, 4]), result)
    kind = "attack" if result.strength_name == "epsilon" else "corruption"
    figure.suptitle("{} on {}: {} {} (clean mean Dice {}){}{}".format(
        result.model_name, volume.name, result.probe_name, kind, _clean_dice_text(result),
        _strongest_text(result, attacked), _rood_text(result)), fontsize=13)
    figure.savefig(str(path), dpi=80)
    plt.close(figure)


def most_changed_slice(clean, attacked, axis, reference=None):
    """Index along ``axis`` of the slice where most clean foreground voxels (inside the reference's foreground, if
    given, so stray background predictions do not choose the slice) changed label under attack."""
    foreground = (clean > 0) if reference is None else (clean > 0) & (reference > 0)
    changed = ((clean != attacked) & foreground).sum(axis=tuple(a for a in range(3) if a != axis))
    if changed.max() == 0:
        changed = foreground.sum(axis=tuple(a for a in range(3) if a != axis))
    return int(np.argmax(changed))


def display_slice(array_xyz, axis, index):
    """A slice of an RAS-oriented array, superior/anterior up and patient right on screen left (radiological)."""
    plane = np.take(array_xyz, index, axis=axis).T[::-1]
    return plane[:, ::-1] if axis != 0 else plane


def _aspect(zooms, axis):
    """Pixel height / width of a :func:`display_slice` along ``axis``, from the voxel sizes."""
    rows, columns = {2: (1, 0), 1: (2, 0), 0: (2, 1)}[axis]
    return zooms[rows] / zooms[columns]


def _plot_fragility(figure, ax, result, fragility, axis, index, aspect):
    """The clean slice with the fragility map over it: each voxel coloured by the strength at which its label first
    changes, never-changed voxels left out."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    low, high = result.volume.intensity_range
    strengths = [outcome.strength for outcome in result.outcomes[1:]]
    ax.imshow(display_slice(result.volume.array, axis, index), cmap="gray", vmin=low, vmax=high, aspect=aspect)
    edges = [0.0] + [(a + b) / 2.0 for a, b in zip(strengths, strengths[1:])] + [strengths[-1] * 1.5]
    shown = ax.imshow(np.ma.masked_equal(display_slice(fragility, axis, index), 0),
                      cmap=ListedColormap(fragility_colours(len(strengths))), norm=BoundaryNorm(edges, len(strengths)),
                      interpolation="nearest", aspect=aspect)
    ax.set_title("fragility: {} of the first change".format(result.strength_name), fontsize=10)
    ax.axis("off")
    bar = figure.colorbar(shown, ax=ax, shrink=0.8, ticks=strengths)
    bar.ax.set_yticklabels(["{:g}".format(s) for s in strengths])


def _plot_curve(ax, result):
    rows, against = dice_curve_rows(result)
    epsilons = [row[result.strength_name] for row in rows]
    for label in result.labels[1:]:
        ax.plot(epsilons, [row[label.name] for row in rows], "o-", color=label.color, label=label.name)
    ax.plot(epsilons, [row["mean"] for row in rows], "s-", color="black", linewidth=2.5, label="mean")
    ax.set_xlabel(result.strength_label)
    ax.set_ylabel("Dice against {}".format("reference" if against == "reference" else "clean prediction"))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Dice vs {}".format(result.strength_name))


def _clean_dice_text(result):
    value = result.mean_dice(0.0, "reference") if result.reference is not None else None
    return "{:.3f} vs reference".format(value) if value is not None else "n/a (no reference)"


def _strongest_text(result, outcome):
    """Mean Dice, HD95 and SSIM of ``outcome`` against the reference (else the clean prediction)."""
    row = next(row for row in result.rows
               if row[result.strength_name] == outcome.strength and row["label"] == "mean")
    against = result.against
    hd95 = row["hd95_" + against]
    return "\n{}: mean Dice {:.3f}, HD95 {} mm, SSIM {:.3f} (against the {})".format(
        outcome_title(result, outcome), row["dice_" + against], "n/a" if hd95 is None else "{:.1f}".format(hd95),
        row["ssim"], "reference" if against == "reference" else "clean prediction")


def _rood_text(result):
    rood = result.rood_summary()
    if rood is None:
        return ""
    return "\nROOD-MRI summary (alpha 2/3): weighted mean Dice {:.3f}, degradation {:.3f}".format(
        rood["weighted_mean"], rood["degradation"])


def write_classification_report(result, path):
    """A classifier's figure for the strongest strength: the image clean and probed with the class and its
    probability, the perturbation, the clean image's saliency, and the confidence curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .scene.classification import confidence_curve_rows, predicted_text

    volume, attacked = result.volume, result.outcomes[-1]
    spatial = volume.array.shape[-3:]
    axis = int(np.argmin(spatial))  # a one-slice image's own plane; else the thinnest direction
    index = int(np.argmax(np.asarray(result.saliency).sum(axis=tuple(a for a in range(3) if a != axis))))
    aspect = _aspect(np.linalg.norm(volume.affine[:3, :3], axis=0), axis)
    low, high = volume.intensity_range
    limit = max(float(np.abs(attacked.probed - volume.array).max()), 1e-12)
    figure, axes = plt.subplots(1, 5, figsize=(22, 5), constrained_layout=True)
    panels = ((volume.array, "clean: " + predicted_text(result, 0)),
              (attacked.probed, "{}: {}".format(outcome_title(result, attacked),
                                                predicted_text(result, len(result.outcomes) - 1))))
    for ax, (image, title) in zip(axes, panels):
        ax.imshow(_image_slice(image, axis, index, low, high), cmap="gray", vmin=low, vmax=high, aspect=aspect)
        ax.set_title(title, fontsize=10)
    shown = axes[2].imshow(_channel_mean(display_slice_any(attacked.probed - volume.array, axis, index)),
                           cmap="RdBu_r", vmin=-limit, vmax=limit, aspect=aspect)
    axes[2].set_title("perturbation (intensity units)", fontsize=10)
    figure.colorbar(shown, ax=axes[2], shrink=0.8)
    shown = axes[3].imshow(display_slice(np.asarray(result.saliency), axis, index), cmap="inferno", aspect=aspect)
    axes[3].set_title("saliency |d score / d input| (clean)", fontsize=10)
    figure.colorbar(shown, ax=axes[3], shrink=0.8)
    for ax in axes[:4]:
        ax.axis("off")
    rows = confidence_curve_rows(result)
    strengths = [row[result.strength_name] for row in rows]
    axes[4].plot(strengths, [row["confidence"] for row in rows], "o-", label="predicted class")
    if any(row["label_probability"] is not None for row in rows):
        axes[4].plot(strengths, [row["label_probability"] for row in rows], "s-", label="true class")
    axes[4].set_xlabel(result.strength_label)
    axes[4].set_ylabel("probability")
    axes[4].set_ylim(0, 1.02)
    axes[4].grid(alpha=0.3)
    axes[4].legend()
    axes[4].set_title("confidence vs {}".format(result.strength_name))
    figure.suptitle("{} on {}: {} (classification)".format(result.model_name, volume.name, result.probe_name),
                    fontsize=13)
    figure.savefig(str(path), dpi=80)
    plt.close(figure)


def display_slice_any(array, axis, index):
    """:func:`display_slice` of a one-channel (X, Y, Z) or channel-first (C, X, Y, Z) array (channels last)."""
    array = np.asarray(array)
    if array.ndim == 3:
        return display_slice(array, axis, index)
    return np.stack([display_slice(channel, axis, index) for channel in array], axis=-1)


def _channel_mean(plane):
    return plane if plane.ndim == 2 else plane.mean(axis=-1)


def _image_slice(array, axis, index, low, high):
    """A grey slice, or a colour one scaled to [0, 1] by the intensity range."""
    plane = display_slice_any(array, axis, index)
    return plane if plane.ndim == 2 else np.clip((plane - low) / max(high - low, 1e-12), 0.0, 1.0)
