"""Bootstrap intervals over images (torchray_like.benchmark.intervals).

Checked against loops written independently (the pointing game's per-class averaging by
:class:`PointingGame` on each resample), for coverage on simulated data, for pairing, seeding,
degenerate cases and every hostile argument.
"""

from __future__ import annotations

import numpy as np
import pytest

from torchray_like.benchmark.intervals import (
    DEFAULT_RESAMPLES,
    MAX_COUNTS_BYTES,
    MAX_NUM_CLASSES,
    Interval,
    bootstrap,
    mean_contributions,
    mean_interval,
    mean_of_sums,
    paired_difference,
    paired_mean_difference,
    paired_pointing_game_difference,
    pointing_game_accuracy,
    pointing_game_contributions,
    pointing_game_interval,
    resample_counts,
)
from torchray_like.benchmark.pointing_game import MAX_NUM_CLASSES as GAME_MAX_NUM_CLASSES
from torchray_like.benchmark.pointing_game import PointingGame


def random_pairs(n_images, num_classes=5, seed=0, difficult=False):
    """Per image one to three (class, hit) pairs; some 0 (not scored) when ``difficult``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        classes = rng.choice(num_classes, size=rng.integers(1, 4), replace=False)
        hits = [int(rng.choice([1, -1, 0] if difficult else [1, -1], p=None)) for _ in classes]
        out.append([(int(c), h) for c, h in zip(classes, hits)])
    return out


def game_accuracy(pairs, num_classes, weights=None):
    """The pointing game of the images, image i counted weights[i] times (PointingGame)."""
    game = PointingGame(num_classes)
    for i, image in enumerate(pairs):
        for _ in range(1 if weights is None else int(weights[i])):
            for c, hit in image:
                game.aggregate(hit, c)
    return game.accuracy


def quantiles(values, level=0.95):
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    tail = (1 - level) / 2
    return tuple(np.quantile(values, [tail, 1 - tail]))


# ---------------------------------------------------------------------------------------------
# The pointing game


@pytest.mark.parametrize("difficult", [False, True])
def test_pointing_game_interval_is_the_games_per_class_average_on_every_resample(difficult):
    pairs = random_pairs(12, seed=3, difficult=difficult)
    interval = pointing_game_interval(pairs, 5, resamples=200, seed=7)
    assert interval.estimate == pytest.approx(game_accuracy(pairs, 5), abs=1e-12)
    counts = resample_counts(12, 200, 7)
    loop = [game_accuracy(pairs, 5, w) for w in counts]
    low, high = quantiles(loop)
    assert (interval.low, interval.high) == (pytest.approx(low, abs=1e-12),
                                             pytest.approx(high, abs=1e-12))
    assert interval.n == 12 and interval.resamples == 200 and interval.level == 0.95


def test_per_class_average_differs_from_the_pooled_hit_rate():
    # Class 0: 9 hits of 9 pairs; class 1: 0 of 1 -> per-class mean 0.5, pooled rate 0.9.
    pairs = [[(0, 1)]] * 9 + [[(1, -1)]]
    interval = pointing_game_interval(pairs, 2, resamples=500)
    assert interval.estimate == pytest.approx(0.5)
    sums = pointing_game_contributions(pairs, 2).sum(0)
    assert sums.tolist() == [9, 0, 9, 1]
    # A resample without the miss of class 1 has only class 0: accuracy 1.
    assert interval.high == pytest.approx(1.0)


def test_pointing_game_contributions_and_statistic():
    c = pointing_game_contributions([[(0, 1), (2, -1)], [], [(2, 1), (1, 0)]], 3)
    assert c.tolist() == [[1, 0, 0, 1, 0, 1], [0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1]]
    assert pointing_game_accuracy(c.sum(0)) == pytest.approx((1 + 0.5) / 2)
    assert np.isnan(pointing_game_accuracy(np.zeros(6)))          # no class scored
    batch = pointing_game_accuracy(np.stack([c.sum(0), c[0]]))
    assert batch.shape == (2,) and batch[1] == pytest.approx(0.5)


def test_images_without_scored_pairs_are_drawn_like_the_others():
    pairs = [[(0, 1)], [], [(0, -1)], []]
    interval = pointing_game_interval(pairs, 1, resamples=300)
    assert interval.n == 4 and interval.estimate == pytest.approx(0.5)
    # Resamples of only empty images are undefined and left out of the percentiles.
    assert 0.0 <= interval.low <= interval.high <= 1.0


def test_paired_pointing_game_difference_against_a_loop():
    a = random_pairs(15, seed=1)
    b = [[(c, -h if k % 3 == 0 else h) for c, h in image] for k, image in enumerate(a)]
    d = paired_pointing_game_difference(a, b, 5, resamples=300, seed=2)
    assert d.estimate == pytest.approx(game_accuracy(a, 5) - game_accuracy(b, 5), abs=1e-12)
    loop = [game_accuracy(a, 5, w) - game_accuracy(b, 5, w) for w in resample_counts(15, 300, 2)]
    low, high = quantiles(loop)
    assert d.low == pytest.approx(low, abs=1e-12) and d.high == pytest.approx(high, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Means, pairing, seeding


def test_mean_interval_against_a_loop_and_nan_ignored():
    rng = np.random.default_rng(0)
    v = rng.normal(size=30)
    v[[3, 17]] = np.nan
    interval = mean_interval(v, resamples=400, seed=5)
    assert interval.estimate == pytest.approx(np.nanmean(v))
    assert interval.n == 28                                        # defined values
    counts = resample_counts(30, 400, 5)
    defined = ~np.isnan(v)
    loop = [np.sum(w[defined] * v[defined]) / np.sum(w[defined]) for w in counts]
    assert (interval.low, interval.high) == tuple(pytest.approx(q) for q in quantiles(loop))
    assert interval.low < interval.estimate < interval.high


def test_coverage_of_the_mean_on_simulated_data():
    """About 95 % of the intervals of simulated data sets cover the true mean."""
    rng = np.random.default_rng(1)
    hits = 0
    trials = 300
    for k in range(trials):
        data = rng.binomial(1, 0.7, size=120).astype(float)
        interval = mean_interval(data, resamples=1000, seed=k % 7)
        hits += interval.low <= 0.7 <= interval.high
    assert 0.89 <= hits / trials <= 0.99, hits / trials


def test_pairing_removes_what_the_images_share():
    rng = np.random.default_rng(2)
    difficulty = rng.normal(0, 1.0, size=40)          # shared by both methods
    a = difficulty + 0.3 + rng.normal(0, 0.1, size=40)
    b = difficulty + rng.normal(0, 0.1, size=40)
    paired = paired_mean_difference(a, b)
    alone_a, alone_b = mean_interval(a), mean_interval(b)
    assert paired.estimate == pytest.approx(np.mean(a) - np.mean(b))
    assert paired.significant and paired.low > 0.2
    # The marginal intervals overlap: compared one by one, the difference looks unresolved.
    assert alone_a.low < alone_b.high
    assert paired.high - paired.low < 0.25 * (alone_a.high - alone_a.low)


def test_paired_mean_difference_leaves_out_images_undefined_in_either():
    a = [1.0, 2.0, np.nan, 4.0]
    b = [0.0, np.nan, 1.0, 1.0]
    d = paired_mean_difference(a, b, resamples=200)
    assert d.n == 2 and d.estimate == pytest.approx((1 + 4) / 2 - (0 + 1) / 2)


def test_identical_methods_give_a_zero_degenerate_difference():
    pairs = random_pairs(10, seed=4)
    d = paired_pointing_game_difference(pairs, pairs, 5)
    assert (d.estimate, d.low, d.high) == (0.0, 0.0, 0.0)
    assert d.degenerate and not d.significant
    assert d.format(100, signed=True) == "+0.0 [+0.0, +0.0]*"


def test_seeded_and_reproducible_and_the_global_generator_untouched():
    values = np.random.default_rng(3).normal(size=25)
    state = np.random.get_state()
    first = mean_interval(values, seed=11)
    assert mean_interval(values, seed=11) == first
    assert mean_interval(values, seed=12) != first
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1])


def test_resample_counts_are_read_only_multinomial_rows():
    counts = resample_counts(9, 150, 0)
    assert counts.shape == (150, 9) and counts.dtype == np.float64
    assert np.all(counts.sum(1) == 9)
    assert not counts.flags.writeable
    with pytest.raises(ValueError):
        counts[0, 0] = 1.0
    assert DEFAULT_RESAMPLES == 2000


def test_generic_bootstrap_with_a_ratio_statistic():
    # Hits and trials per image: the pooled rate.
    c = np.array([[3, 4], [1, 4], [4, 4], [0, 2]], dtype=float)
    interval = bootstrap(c, lambda s: s[..., 0] / s[..., 1], resamples=300)
    assert interval.estimate == pytest.approx(8 / 14)
    loop = [(w @ c)[0] / (w @ c)[1] for w in resample_counts(4, 300, 0)]
    assert (interval.low, interval.high) == tuple(pytest.approx(q) for q in quantiles(loop))


def test_paired_difference_of_two_statistics():
    a = mean_contributions([1.0, 2.0, 3.0])
    b = pointing_game_contributions([[(0, 1)], [(0, -1)], [(0, 1)]], 1)
    d = paired_difference(a, b, mean_of_sums, statistic_b=pointing_game_accuracy,
                          resamples=200)
    assert d.estimate == pytest.approx(2.0 - 2 / 3)


# ---------------------------------------------------------------------------------------------
# Degenerate cases and formatting


def test_all_hits_is_flagged_degenerate():
    interval = pointing_game_interval([[(0, 1)], [(1, 1)], [(0, 1)]], 2)
    assert (interval.estimate, interval.low, interval.high) == (1.0, 1.0, 1.0)
    assert interval.degenerate
    assert interval.format(100) == "100.0 [100.0, 100.0]*"


def test_one_image_is_degenerate_and_an_undefined_statistic_is_nan():
    assert mean_interval([0.4]).degenerate
    nothing = mean_interval([np.nan, np.nan])
    assert np.isnan(nothing.estimate) and np.isnan(nothing.low) and nothing.n == 0
    assert nothing.format() == "-"
    empty = pointing_game_interval([[(0, 0)], [(1, 0)]], 2)           # nothing scored
    assert np.isnan(empty.estimate) and empty.format(100) == "-"


def test_format():
    i = Interval(0.8661, 0.8012, 0.9203, 64)
    assert i.format(100) == "86.6 [80.1, 92.0]"
    d = Interval(0.1071, 0.0612, 0.1523, 64)
    assert d.format(100, signed=True) == "+10.7 [+6.1, +15.2]"
    assert Interval(-0.0004, -0.004, 0.003, 10).format(digits=2) == "0.00 [0.00, 0.00]"
    assert Interval(0.5, 0.4, 0.6, 10).as_dict("all") == {"all": 0.5, "all_low": 0.4,
                                                         "all_high": 0.6}
    assert Interval(0.2, 0.1, 0.3, 5).significant
    assert Interval(-0.2, -0.3, -0.1, 5).significant
    assert not Interval(0.2, 0.0, 0.3, 5).significant


# ---------------------------------------------------------------------------------------------
# Hostile arguments


@pytest.mark.parametrize("kwargs, match", [
    ({"level": 0}, "level must be a coverage in \\(0, 1\\)"),
    ({"level": 1.5}, "level must be"),
    ({"level": True}, "level must be"),
    ({"level": "95"}, "level must be"),
    ({"resamples": 10}, "resamples must be an int >= 100"),
    ({"resamples": 500.0}, "resamples must be an int"),
    ({"seed": -1}, "seed must be a non-negative int"),
    ({"seed": 1.5}, "seed must be"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mean_interval([1.0, 2.0, 3.0], **kwargs)
    with pytest.raises(ValueError, match=match):
        pointing_game_interval([[(0, 1)]], 1, **kwargs)


@pytest.mark.parametrize("values, match", [
    ([], "non-empty 1-D"),
    ([[1.0, 2.0]], "non-empty 1-D"),
    ([1.0, np.inf], "infinite"),
    (["a", "b"], "1-D sequence of numbers"),
])
def test_bad_values(values, match):
    with pytest.raises(ValueError, match=match):
        mean_interval(values)


@pytest.mark.parametrize("pairs, num_classes, match", [
    ([], 3, "at least one image"),
    ([[(3, 1)]], 3, r"pairs\[0\]: class_id must be an int in \[0, 3\)"),
    ([[(True, 1)]], 3, "class_id must be an int"),
    ([[(0, 2)]], 3, r"pairs\[0\]: hit must be \+1"),
    ([[(0, True)]], 3, "hit must be"),
    ([[0]], 3, r"pairs\[0\] must hold \(class_id, hit\) pairs"),
    ([[(0, 1)]], 0, "num_classes must be a positive int"),
])
def test_bad_pairs(pairs, num_classes, match):
    with pytest.raises(ValueError, match=match):
        pointing_game_interval(pairs, num_classes)


@pytest.mark.parametrize("function", ["interval", "contributions", "paired"])
@pytest.mark.parametrize("num_classes", [10 ** 12, MAX_NUM_CLASSES + 1, np.int64(2 ** 40),
                                         10 ** 400])
def test_huge_num_classes_is_refused_before_allocating(function, num_classes):
    # Was NumPy's MemoryError (10**12 classes: a 14.6 TiB array), as PointingGame's allocator
    # error was: the same bound, the same message.
    pairs = [[(0, 1)], [(1, -1)]]
    call = {"interval": lambda: pointing_game_interval(pairs, num_classes),
            "contributions": lambda: pointing_game_contributions(pairs, num_classes),
            "paired": lambda: paired_pointing_game_difference(pairs, pairs, num_classes)}
    with pytest.raises(ValueError) as info:
        call[function]()
    message = str(info.value)
    assert message.startswith(f"num_classes={num_classes} is more than "
                              f"MAX_NUM_CLASSES={MAX_NUM_CLASSES} (each image's per-class "
                              "contributions would take ")
    assert "GiB" in message and "give the number of classes of the data set" in message
    assert GAME_MAX_NUM_CLASSES is MAX_NUM_CLASSES  # one home


def test_the_interval_keeps_only_the_scored_classes():
    # The largest legal num_classes costs no memory in the bootstrap: the classes without a
    # scored pair are never "seen" and are left out, which changes no value.
    pairs = [[(3, 1), (MAX_NUM_CLASSES - 1, -1)], [(3, -1)], [(0, 0)], [(3, 1)]]
    big = pointing_game_interval(pairs, MAX_NUM_CLASSES, resamples=200)
    small_pairs = [[(3, 1), (4, -1)], [(3, -1)], [(0, 0)], [(3, 1)]]
    small = pointing_game_interval(small_pairs, 5, resamples=200)
    assert big == small and big.estimate == pytest.approx((2 / 3 + 0) / 2)
    d = paired_pointing_game_difference(pairs, pairs, MAX_NUM_CLASSES, resamples=200)
    assert d.estimate == 0 and d.low == d.high == 0 and d.degenerate
    # Nothing scored: an undefined interval, as before.
    empty = pointing_game_interval([[(2, 0)], []], 10 ** 6, resamples=200)
    assert np.isnan(empty.estimate) and np.isnan(empty.low) and empty.degenerate


def test_the_interval_of_a_data_set_is_the_dense_bootstrap_bit_for_bit():
    """Below the byte limit every class keeps its columns: the interval is, bit for bit, the
    bootstrap of pointing_game_contributions (the main job's table does not move with the
    memory bound of huge class counts)."""
    rng = np.random.default_rng(0)
    # Classes 13..19 never scored: keeping only the scored columns moves the low bound by one
    # unit in the last place here (the classes' mean summed in another order).
    pairs = [[(int(c), int(rng.choice([-1, 1]))) for c in rng.choice(13, 3, replace=False)]
             for _ in range(40)]
    got = pointing_game_interval(pairs, 20, resamples=300, seed=5)
    want = bootstrap(pointing_game_contributions(pairs, 20), pointing_game_accuracy,
                     resamples=300, seed=5)
    assert (got.estimate, got.low, got.high) == (want.estimate, want.low, want.high)
    other = [[(c, -h) for c, h in image] for image in pairs]
    got = paired_pointing_game_difference(pairs, other, 20, resamples=300, seed=5)
    want = paired_difference(pointing_game_contributions(pairs, 20),
                             pointing_game_contributions(other, 20), pointing_game_accuracy,
                             resamples=300, seed=5)
    assert (got.estimate, got.low, got.high) == (want.estimate, want.low, want.high)


def test_contributions_above_the_byte_limit_are_refused():
    n = MAX_COUNTS_BYTES // (16 * MAX_NUM_CLASSES) + 1      # 17 images of 2**24 classes: 4.25 GiB
    with pytest.raises(ValueError, match=rf"num_classes={MAX_NUM_CLASSES} for {n} images needs "
                                         r"a 4.25 GiB array .* call pointing_game_interval"):
        pointing_game_contributions([[]] * n, MAX_NUM_CLASSES)
    assert pointing_game_contributions([[(1, 1)]] * 3, 2).tolist() == [[0, 1, 0, 1]] * 3


def test_paired_arguments_must_hold_the_same_images():
    with pytest.raises(ValueError, match="same images.*got 3 and 2"):
        paired_mean_difference([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="same images, row for row: got 2 and 1 images"):
        paired_pointing_game_difference([[(0, 1)], [(0, 1)]], [[(0, 1)]], 1)


def test_bad_contributions_and_statistic():
    with pytest.raises(ValueError, match="contributions must be a non-empty \\(images, k\\)"):
        bootstrap(np.zeros(3), mean_of_sums)
    with pytest.raises(ValueError, match="contributions must be finite"):
        bootstrap(np.array([[np.nan, 1.0]]), mean_of_sums)
    with pytest.raises(ValueError, match="statistic must map sums"):
        bootstrap(np.ones((3, 2)), lambda s: s)
    with pytest.raises(ValueError, match="n must be a positive int"):
        resample_counts(0)


def test_verdict():
    from torchray_like.benchmark.intervals import MIN_IMAGES, verdict

    assert MIN_IMAGES == 8
    assert verdict(Interval(0.2, 0.1, 0.3, 64)) == "reproduced"
    assert verdict(Interval(-0.2, -0.3, -0.1, 64)) == "reversed"
    assert verdict(Interval(0.2, 0.0, 0.3, 64)) == "not resolved"       # zero inside
    assert verdict(Interval(np.nan, np.nan, np.nan, 64)) == "not resolved"
    assert verdict(Interval(0.2, 0.1, 0.3, 7)) == "too few images"
    assert verdict(Interval(0.2, 0.1, 0.3, 64), "better", "worse") == "better"
    # Two images agreeing in sign: "significant" to the bootstrap, not to the verdict.
    two = paired_mean_difference([1.0, 2.0], [0.0, 0.5], resamples=200)
    assert two.significant and verdict(two) == "too few images"


def test_compare_orderings_pairs_the_shared_images_and_judges():
    from torchray_like.benchmark.intervals import (
        PUBLISHED_ORDERINGS,
        compare_orderings,
        format_orderings,
    )

    rng = np.random.default_rng(5)
    n = 40
    truth = {"grad_cam": 0.95, "center": 0.3, "gradient": 0.8, "rise": 0.9}
    # Every method scored on the same (image, class) pairs, as the benchmark does.
    classes = [int(rng.integers(0, 4)) for _ in range(n)]
    hits = {m: [[(classes[i], 1 if rng.random() < p else -1)] for i in range(n)]
            for m, p in truth.items()}

    def pairs_of(model, method, subset):
        images = range(12) if method == "rise" else range(n)       # RISE on fewer images
        return {i: hits[method][i] for i in images}

    out = compare_orderings(pairs_of, ["m"], list(truth), 4, seed=1)
    assert [(c["subset"], c["better"], c["worse"]) for c in out] == [
        (o[0], o[1], o[2]) for o in PUBLISHED_ORDERINGS
        if o[1] in truth and o[2] in truth]
    first = out[0]                                                  # grad_cam - center, all
    d = paired_pointing_game_difference(hits["grad_cam"], hits["center"], 4, seed=1)
    assert (first["difference"], first["difference_low"], first["difference_high"]) == \
        pytest.approx((d.estimate, d.low, d.high))
    assert first["published"] == pytest.approx(17.0) and first["verdict"] == "reproduced"
    rise = next(c for c in out if c["better"] == "rise")
    assert rise["images"] == 12
    text = format_orderings(out)
    assert "Grad-CAM - centre" in text and "m: 1 of 4 reproduced significantly" not in text
    assert text.splitlines()[-1].startswith("  m: ")
    assert format_orderings([]) == ""


def test_paired_difference_refuses_pairs_of_other_classes():
    # Before: [(0, hit)] against [(1, hit)] on one image gave a difference of 0 with n = 1,
    # comparing two different questions.
    with pytest.raises(ValueError, match=r"image 0 was scored on classes \[0\] in pairs_a and "
                                         r"\[1\] in pairs_b"):
        paired_pointing_game_difference([[(0, 1)]], [[(1, 1)]], 3, resamples=100)
    # The same pairs in another order per image are the same questions: 1 of 2 hits
    # against 2 of 2.
    d = paired_pointing_game_difference([[(0, 1), (2, -1)]] * 3, [[(2, 1), (0, 1)]] * 3, 3,
                                        resamples=100)
    assert d.estimate == pytest.approx(-0.5) and d.n == 3
