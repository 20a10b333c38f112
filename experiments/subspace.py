"""Study 4: how much of the r=8 adapter's update the r=64 adapter's contains, per layer,
for q and v: the paper's normalised subspace similarity (its section 7.2)

    φ(i, j) = ‖U₈[:, :i]ᵀ U₆₄[:, :j]‖²_F / min(i, j)  ∈ [0, 1],

where U_r holds the left singular vectors of ΔW = A·B (the input-space directions, the
row space of the paper's A), strongest first. Two independent random subspaces of R^d give
φ ≈ max(i, j) / d on average; the same subspace gives 1. It also compares the r=64
adapters of two seeds. Uses the rank sweep's runs (trains them if study 3 has not).

    python -m experiments.subspace           # seconds after study 3; ~6 min alone
"""

from __future__ import annotations

import pathlib
import time

import numpy as np

from experiments import common, ranks

STEPS, BATCH = ranks.STEPS, ranks.BATCH
MODULES = ("query", "value")


def delta_w(adapters: dict, layer: int, module: str) -> np.ndarray:
    """ΔW of one adapter as an (in, out) matrix (its scale does not change the subspaces)."""
    leaves = adapters["bert"]["encoder"][f"layer_{layer}"]["attention"]["self"][module]
    a, b = np.asarray(leaves["lora_a"]), np.asarray(leaves["lora_b"])
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def directions(w: np.ndarray, k: int) -> np.ndarray:
    """The top-k left singular vectors of `w`, as columns."""
    u, _, _ = np.linalg.svd(w, full_matrices=False)
    return u[:, :k]


def phi(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """φ(i, j) for i ≤ u's columns, j ≤ v's columns (a (i, j) grid)."""
    overlap = (u.T @ v) ** 2  # squared cosines between single directions
    cumulative = overlap.cumsum(0).cumsum(1)
    i, j = np.arange(1, u.shape[1] + 1)[:, None], np.arange(1, v.shape[1] + 1)[None, :]
    return cumulative / np.minimum(i, j)


def main(argv: list[str] | None = None) -> None:
    args = common.parser(__doc__, STEPS, BATCH).parse_args(argv)
    scale = common.scale_of(args)
    started = time.perf_counter()
    setup = common.encoder(scale.rows)
    runs = args.out / "runs"
    seeds = scale.seeds[:2] if len(scale.seeds) > 1 else scale.seeds * 2
    trained = {
        (r, seed): common.adapters_of(
            common.run(setup, ranks.rank_method(r), seed, scale.steps, scale.batch_size, runs), runs
        )
        for r in (8, 64)
        for seed in sorted(set(seeds))
    }
    layers = setup.pretrained.model.config.num_layers
    random = np.random.default_rng(0)
    rows, grids = [], {}
    for layer in range(layers):
        for module in MODULES:
            u8, u64 = (directions(delta_w(trained[r, seeds[0]], layer, module), r) for r in (8, 64))
            other = directions(delta_w(trained[64, seeds[1]], layer, module), 64)
            noise = np.linalg.qr(random.normal(size=(u8.shape[0], 64)))[0]
            grid = phi(u8, u64)
            grids[layer, module] = grid
            rows.append(
                {
                    "method": f"layer {layer} {module}",
                    "layer": layer,
                    "module": module,
                    "phi_1_1": grid[0, 0],  # the strongest directions of r=8 and r=64
                    "phi_8_8": grid[7, 7],
                    "phi_1_64": grid[0, 63],  # r=8's top direction inside r=64's whole subspace
                    "phi_8_64": grid[7, 63],
                    "seeds_phi_1_1": phi(other, u64)[0, 0],  # two seeds of r=64
                    "seeds_phi_8_8": phi(other[:, :8], u64[:, :8])[7, 7],
                    "random_phi_8_64": phi(u8, noise)[7, 63],  # r=8 against a random 64-dim subspace
                }
            )
    config = {
        "model": setup.model,
        "runs": {f"r={r} seed {s}": "rank sweep (study 3)" for r, s in trained},
        "steps": scale.steps,
        "batch_size": scale.batch_size,
        "seeds": list(seeds),
        "directions": "left singular vectors of ΔW = A·B, (in, out) layout",
    }
    common.write_csv(args.out / "subspace.csv", rows, config)
    columns = {
        "φ(1,1)": "phi_1_1",
        "φ(8,8)": "phi_8_8",
        "φ(1,64)": "phi_1_64",
        "φ(8,64)": "phi_8_64",
        "seeds r=64: φ(1,1)": "seeds_phi_1_1",
        "seeds r=64: φ(8,8)": "seeds_phi_8_8",
        "random: φ(8,64)": "random_phi_8_64",
    }
    table = common.summary_table(rows, {name: common.first(field, "{:.2f}") for name, field in columns.items()})
    title = "Study 4: subspace similarity of the r=8 and r=64 q,v adapters, all-MiniLM-L6-v2 / Rotten Tomatoes"
    common.write_markdown(args.out / "subspace.md", title, table, config, time.perf_counter() - started)
    heatmaps(grids, layers, args.out / "subspace.png")
    print(table)


def heatmaps(grids: dict, layers: int, path: pathlib.Path) -> None:
    """φ(i, j) for i ≤ 8, j ≤ 64 (top row per module) and its j ≤ 8 corner, per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 * len(MODULES), layers, figsize=(2.2 * layers, 5.6), squeeze=False)
    for m, module in enumerate(MODULES):
        for layer in range(layers):
            grid = grids[layer, module]
            for row, (crop, label) in enumerate(((grid, "j ≤ 64"), (grid[:, :8], "j ≤ 8"))):
                ax = axes[2 * m + row, layer]
                image = ax.imshow(crop, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
                ax.set_title(f"layer {layer} {module}, {label}", fontsize=7)
                ax.set_yticks([0, 7], ["1", "8"], fontsize=6)
                ax.set_xticks([0, crop.shape[1] - 1], ["1", str(crop.shape[1])], fontsize=6)
    fig.colorbar(image, ax=axes, shrink=0.6, label="φ(i, j): i rows (r=8), j columns (r=64)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
