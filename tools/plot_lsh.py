"""Plot the LSH S-curve 1 - (1 - s^r)^b next to the candidate rate measured on text pairs.

    python tools/plot_lsh.py --texts PATH/TO/prose --bands 14 --rows 8 --out docs/lsh_s_curve.png

Pairs: pages of --words-per-page words cut from the given text files (searched recursively),
each paired with an edited copy in which a random fraction of the words (uniform in [0, 0.6])
is replaced by words from another page, so that the true Jaccard similarity of the 5-gram
shingle sets covers (0, 1]. For every pair, the true Jaccard and whether MinHash-LSH makes it a
candidate (some band agrees) are recorded; the plot shows the candidate rate per similarity
bin (with binomial standard errors) over the curve for each (b, r), the threshold
(1/b)^(1/r) marked.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

from jaxlm.curation import minhash


def make_pairs(paths: list[str], words_per_page: int, num_pairs: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    pages = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as file:
            words = file.read().split()
        pages += [words[start:start + words_per_page] for start in range(0, len(words) - words_per_page, words_per_page)]
    if len(pages) < 2:
        raise SystemExit(f"error: need at least two pages of {words_per_page} words in the texts given")
    pairs = []
    for _ in range(num_pairs):
        first, donor = (pages[index] for index in rng.choice(len(pages), 2, replace=False))
        edited = list(first)
        replaced = rng.random(len(edited)) < rng.uniform(0.0, 0.6)
        for position in np.flatnonzero(replaced):
            edited[position] = donor[position]
        pairs.append((" ".join(first), " ".join(edited)))
    return pairs


def measure(pairs, bands: int, rows: int, ngrams: int) -> tuple[np.ndarray, np.ndarray]:
    config = minhash.MinHashConfig(num_hashes=bands * rows, num_bands=bands, ngrams=ngrams)
    sets = [minhash.shingle_hashes(text, ngrams) for pair in pairs for text in pair]
    keys = minhash.band_keys(minhash.minhash_signatures(sets, config), bands)
    similarity = np.array([minhash.jaccard(sets[2 * i], sets[2 * i + 1]) for i in range(len(pairs))])
    candidate = np.array([(keys[2 * i] == keys[2 * i + 1]).any() for i in range(len(pairs))])
    return similarity, candidate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", required=True, help="folder of .txt files (or one file)")
    parser.add_argument("--bands", type=int, nargs="+", default=[14, 20], help="b values, paired with --rows")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 5], help="r values, one per --bands")
    parser.add_argument("--ngrams", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--words-per-page", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="lsh_s_curve.png")
    arguments = parser.parse_args()
    if len(arguments.bands) != len(arguments.rows):
        raise SystemExit("error: give as many --rows as --bands")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [arguments.texts] if os.path.isfile(arguments.texts) else sorted(
        glob.glob(os.path.join(arguments.texts, "**", "*.txt"), recursive=True))
    pairs = make_pairs(paths, arguments.words_per_page, arguments.pairs, arguments.seed)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    grid = np.linspace(0, 1, 201)
    edges = np.linspace(0, 1, 21)
    for (bands, rows), color in zip(zip(arguments.bands, arguments.rows), ["C0", "C1", "C2", "C3"]):
        similarity, candidate = measure(pairs, bands, rows, arguments.ngrams)
        threshold = (1 / bands) ** (1 / rows)
        axis.plot(grid, 1 - (1 - grid**rows) ** bands, color=color, label=f"1-(1-s^{rows})^{bands}, k={bands * rows}")
        axis.axvline(threshold, color=color, linestyle=":", label=f"(1/b)^(1/r) = {threshold:.3f}")
        bins = np.digitize(similarity, edges) - 1
        for index in range(len(edges) - 1):
            inside = bins == index
            if inside.sum() >= 10:
                rate = candidate[inside].mean()
                error = np.sqrt(rate * (1 - rate) / inside.sum())
                axis.errorbar(similarity[inside].mean(), rate, yerr=error, fmt="o", color=color, markersize=4)
    axis.set_xlabel("true Jaccard similarity of 5-gram shingle sets")
    axis.set_ylabel("P(candidate pair)")
    axis.set_title(f"MinHash LSH S-curves; dots: {len(pairs)} measured page pairs")
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(arguments.out, dpi=120)
    print(f"wrote {arguments.out}")


if __name__ == "__main__":
    main()
