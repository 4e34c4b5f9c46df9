"""Every figure tempkd draws. matplotlib is optional (requirements-dev.txt installs it): without it
each figure is skipped with one line saying how to get it."""
import json
import math


def pyplot(path):
    """matplotlib.pyplot, drawing to files; None (after saying so) when matplotlib is not
    installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{path} not written: matplotlib is not installed (pip install matplotlib)")
        return None
    return plt


def loss_curves(out):
    """<run>/loss.png: training loss (and CE) per logged step, validation CE per epoch, from
    log.jsonl."""
    plt = pyplot(out / "loss.png")
    if plt is None:
        return
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    if not steps:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
    if any(r.get("kd") is not None for r in steps):
        ax.plot([r["step"] for r in steps], [r["ce"] for r in steps], label="train CE", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    validation = [r for r in rows if "val_loss" in r]
    if validation:
        ax.plot([r["step"] for r in validation], [r["val_loss"] for r in validation], "o-",
                label="validation CE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)


def tau_grid(objectives, taus, values, spreads, title, out_dir):
    """heatmap.png (objective x tau) and tau_curves.png (ROUGE-L against tau, error bars = std over
    training seeds) from values[i][j] / spreads[i][j] of objective i at taus[j] (nan: not run);
    `title` names the SFT rows."""
    plt = pyplot(f"{out_dir}/heatmap.png and tau_curves.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(1.2 * len(taus) + 2, 0.5 * len(objectives) + 1.5))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(taus)), [f"{t:g}" for t in taus])
    ax.set_yticks(range(len(objectives)), objectives)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="white", fontsize=8)
    ax.set_xlabel("KD temperature τ")
    ax.set_title("ROUGE-L")
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(out_dir / "heatmap.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for o, row, spread in zip(objectives, values, spreads):
        points = [(t, v, s) for t, v, s in zip(taus, row, spread) if not math.isnan(v)]
        if len(points) > 1:  # error bars: the std over training seeds
            t, v, err = zip(*points)
            ax.errorbar(t, v, yerr=err, marker="o", capsize=2, label=o)
    # the SFT rows (teacher, warm start) go in the title: as lines they would squash the students'
    # curves
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("KD temperature τ")
    ax.set_ylabel("ROUGE-L")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "tau_curves.png", dpi=120)
    plt.close(fig)


def gradient_analysis(rows, path):
    """analysis.py's figure: non-target mass, gradient norms, cosine and Prop. 2.1's gap against
    tau."""
    plt = pyplot(path)
    if plt is None:
        return
    taus = [r["tau"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    axes[0].plot(taus, [r["teacher_non_target_mass"] for r in rows], "o-")
    axes[0].set_title("teacher non-target mass 1 − p_t")
    for name, style in (("fkl", "-"), ("rkl", "--")):
        axes[1].plot(taus, [r[f"{name}_target"] for r in rows], "o" + style,
                     label=f"{name.upper()} target")
        axes[1].plot(taus, [r[f"{name}_non_target"] for r in rows], "s" + style,
                     label=f"{name.upper()} non-target")
    axes[1].set_yscale("log")
    axes[1].set_title("gradient norm (per token)")
    axes[1].legend(fontsize=7)
    axes[2].plot(taus, [r["cosine_fkl_rkl"] for r in rows], "o-")
    axes[2].set_title("cosine(FKL grad, RKL grad)")
    axes[3].plot(taus, [r["prop21_gap_fkl"] for r in rows], "o-", label="FKL")
    axes[3].plot(taus, [r["prop21_gap_rkl"] for r in rows], "s--", label="RKL")
    axes[3].set_yscale("log")
    axes[3].set_title("Prop. 2.1: ‖τ²g − Δ_c/V‖ / ‖Δ_c/V‖")
    axes[3].legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("τ")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_curves(curves, title, path):
    """evaluate.py compare's figure: {label: [(tau, mean, std)]}, a line per objective and grid."""
    plt = pyplot(path)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in curves.items():
        if points:
            t, v, err = zip(*points)
            ax.errorbar(t, v, yerr=err, marker="o", capsize=2, label=label,
                        linestyle="-" if label.startswith("FKL") else "--")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("KD temperature τ")
    ax.set_ylabel("ROUGE-L")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
