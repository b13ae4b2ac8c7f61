"""The report's sentences follow their numbers: feed swapped, tied, conflicting and missing
measurements and check that the words change with them."""

import pytest

from vaelab import prose
from vaelab.prose import (CONFIDENT, COVERAGE, FD, KID, PRECISION, RECALL, SAMPLE_METRICS, compare,
                          figure_caption, verdict, verdict_sentence)


def quality(fd=100.0, kid=0.05, precision=0.5, recall=0.5, confident=0.5, fd_std=1.0, kid_std=0.002,
            se=0.01, n=2000, coverage=0.5):
    """A per-set sample-quality dict in the format of metrics.quality."""
    return {"fd": fd, "fd_std": fd_std, "kid": kid, "kid_std": kid_std,
            "precision": precision, "precision_se": se, "recall": recall, "recall_se": se,
            "coverage": coverage, "coverage_se": se, "confident_share": confident, "confident_share_se": se, "class_histogram": [0.1] * 10, "n": n}


GOOD = quality(fd=50.0, kid=0.02, precision=0.7, recall=0.6, confident=0.8)
BAD = quality(fd=150.0, kid=0.09, precision=0.4, recall=0.3, confident=0.5)


# --- one metric -----------------------------------------------------------------------------------


def test_lower_is_better_metric_names_the_lower_model_and_swaps_with_the_numbers():
    c = compare(FD, "A", GOOD, "B", BAD)
    assert c.better == "A" and c.status == "clear"
    assert "A clearly better" in c.sentence() and "lower by 100," in c.sentence()
    swapped = compare(FD, "A", BAD, "B", GOOD)
    assert swapped.better == "B" and "B clearly better" in swapped.sentence()


def test_higher_is_better_metric_and_shares_in_percentage_points():
    c = compare(PRECISION, "A", GOOD, "B", BAD)
    assert c.better == "A" and "higher by 0.300" in c.sentence()
    assert compare(PRECISION, "A", BAD, "B", GOOD).better == "B"
    c = compare(CONFIDENT, "A", GOOD, "B", BAD)
    assert "A 80.0%, B 50.0%" in c.sentence() and "higher by 30.0 percentage points" in c.sentence()


def test_numbers_keep_three_significant_digits_whatever_the_scale():
    assert prose.significant(0.5704, 3) == "0.570" and prose.significant(191.04, 3) == "191"
    assert prose.significant(0.04981, 3) == "0.0498" and prose.significant(0.0, 3) == "0"
    c = compare(FD, "A", quality(fd=0.57, fd_std=0.01), "B", quality(fd=0.41, fd_std=0.01))
    assert "A 0.570, B 0.410" in c.sentence() and "lower by 0.16" in c.sentence()


def test_clear_only_beyond_two_combined_standard_errors():
    # se 0.01 each: combined 0.01 * sqrt(2) = 0.01414; twice that is 0.0283
    a, b = quality(precision=0.52), quality(precision=0.50)
    c = compare(PRECISION, "A", a, "B", b)
    assert c.se == pytest.approx(0.01 * 2 ** 0.5)
    assert c.status == "noise" and "no clear difference" in c.sentence() and "clearly" not in c.sentence()
    c = compare(PRECISION, "A", quality(precision=0.53), "B", b)
    assert c.status == "clear"


def test_metric_without_uncertainty_is_never_clear():
    a, b = quality(fd=50.0, fd_std=None), quality(fd=150.0)
    c = compare(FD, "A", a, "B", b)
    assert c.se is None and c.status == "unquantified"
    assert "noise is unknown" in c.sentence() and "clearly" not in c.sentence()


def test_missing_or_nan_metric_gives_no_comparison():
    assert compare(KID, "A", {"fd": 1.0}, "B", BAD) is None
    assert compare(KID, "A", quality(kid=float("nan")), "B", BAD) is None


# --- several metrics ------------------------------------------------------------------------------


def test_verdict_a_better_b_better_and_swapped_sentences():
    v = verdict(SAMPLE_METRICS, "A", GOOD, "B", BAD)
    assert v.outcome == "a" and v.winner == "A"
    assert verdict_sentence(v).startswith("A measured better than B: clearly on Fréchet distance, KID")
    w = verdict(SAMPLE_METRICS, "A", BAD, "B", GOOD)
    assert w.outcome == "b" and verdict_sentence(w).startswith("B measured better than A")


def test_verdict_within_noise():
    v = verdict(SAMPLE_METRICS, "A", quality(), "B", quality(fd=100.5, precision=0.51))
    assert v.outcome == "none" and v.winner is None
    s = verdict_sentence(v)
    assert s.startswith("No clear difference between A and B") and "better" not in s


def test_verdict_says_when_metrics_disagree_instead_of_picking_one():
    # FD and KID favour A, precision favours B
    a = quality(fd=50.0, kid=0.02, precision=0.4)
    b = quality(fd=150.0, kid=0.09, precision=0.7)
    v = verdict(SAMPLE_METRICS, "A", a, "B", b)
    assert v.outcome == "disagree" and v.winner is None
    s = verdict_sentence(v)
    assert "disagree" in s and "Fréchet distance and KID clearly favour A" in s and "precision clearly favours B" in s
    assert "measured better" not in s


def test_precision_recall_tradeoff_is_read_as_a_difference_in_kind():
    v = verdict((PRECISION, RECALL), "A", quality(precision=0.8, recall=0.2), "B", quality(precision=0.3, recall=0.7))
    s = verdict_sentence(v)
    assert "More of A's samples fall among real images' features (precision)" in s
    assert "A is the more faithful, B the more varied" in s
    # Coverage siding with precision: B's recall is then read as stray samples, not variety.
    v = verdict((PRECISION, RECALL, COVERAGE), "A", quality(precision=0.8, recall=0.2, coverage=0.8),
                "B", quality(precision=0.3, recall=0.7, coverage=0.5))
    s = verdict_sentence(v)
    assert "more varied" not in s and "B's higher recall, which coverage does not bear out" in s
    assert "A's samples fall among real images' features (precision), and they also have more real images" in s
    # ... and with the numbers swapped, the same reading the other way round
    v = verdict((PRECISION, RECALL, COVERAGE), "A", quality(precision=0.3, recall=0.7, coverage=0.5),
                "B", quality(precision=0.8, recall=0.2, coverage=0.8))
    assert "A's higher recall, which coverage does not bear out" in verdict_sentence(v)
    # Coverage within noise: recall's reading stands.
    v = verdict((PRECISION, RECALL, COVERAGE), "A", quality(precision=0.8, recall=0.2, coverage=0.6),
                "B", quality(precision=0.3, recall=0.7, coverage=0.595))
    assert "A is the more faithful, B the more varied" in verdict_sentence(v)


def test_disagreement_says_which_side_more_metrics_favour():
    a = quality(fd=50.0, kid=0.02, precision=0.7, recall=0.2, confident=0.8)
    b = quality(fd=150.0, kid=0.09, precision=0.4, recall=0.5, confident=0.5)
    v = verdict(SAMPLE_METRICS, "A", a, "B", b)
    assert v.outcome == "disagree" and v.lean == "a"
    assert "On balance A: 4 of 6 metrics." in verdict_sentence(v)
    w = verdict(SAMPLE_METRICS, "A", b, "B", a)
    assert w.lean == "b" and "On balance B: 4 of 6 metrics." in verdict_sentence(w)


def test_distance_metrics_against_the_classifiers_confidence_get_a_caveat():
    """A failing generator's noise can sit close to real features yet be unrecognizable."""
    noise = quality(fd=0.5, kid=0.03, precision=0.5, recall=0.0, confident=0.03, fd_std=0.01)
    vae = quality(fd=1.8, kid=0.16, precision=0.03, recall=0.03, confident=0.32, fd_std=0.02)
    s = verdict_sentence(verdict(SAMPLE_METRICS, "GAN", noise, "VAE", vae))
    assert "Yet the classifier recognizes fewer of GAN's samples with confidence (3% against 32%)" in s
    assert "before trusting Fréchet distance, KID and precision" in s
    assert prose.recognisability_caveat(verdict(SAMPLE_METRICS, "A", GOOD, "B", BAD)) is None


def test_verdict_names_missing_metrics_and_handles_nothing_to_compare():
    a = {k: v for k, v in GOOD.items() if not k.startswith("kid")}
    v = verdict(SAMPLE_METRICS, "A", a, "B", BAD)
    assert v.missing == ("KID",) and "Not measured for both: KID" in verdict_sentence(v)
    empty = verdict(SAMPLE_METRICS, "A", None, "B", BAD)
    assert empty.outcome == "unmeasured" and "cannot be compared" in verdict_sentence(empty)


def test_unquantified_metric_is_reported_but_does_not_decide():
    a, b = quality(fd=50.0, fd_std=None), quality(fd=150.0)
    v = verdict((FD, CONFIDENT), "A", a, "B", b)
    assert v.outcome == "none"
    assert "Without a measured uncertainty: Fréchet distance (A lower)" in verdict_sentence(v)


# --- answers to the assignment's questions ---------------------------------------------------------


def test_naive_vs_normalized_explanation_follows_the_measured_direction():
    b_better = prose.answer_naive_vs_normalized(verdict(SAMPLE_METRICS, "A", BAD, "B", GOOD), quick=False)
    assert "B measured better than A" in b_better and "pins each code neuron" in b_better
    a_better = prose.answer_naive_vs_normalized(verdict(SAMPLE_METRICS, "A", GOOD, "B", BAD), quick=True)
    assert "A measured better than B" in a_better and "did not show" in a_better
    assert "pins each code neuron" not in a_better and "--quick" in a_better
    mixed = prose.answer_naive_vs_normalized(
        verdict(SAMPLE_METRICS, "A", quality(fd=50.0, precision=0.4), "B", quality(fd=150.0, precision=0.7)), False)
    assert "disagree" in mixed and "differ in kind" in mixed  # one metric each way
    leaning = prose.answer_naive_vs_normalized(
        verdict(SAMPLE_METRICS, "A", quality(fd=50.0, kid=0.01, precision=0.4),
                "B", quality(fd=150.0, kid=0.09, precision=0.7)), False)
    assert "On balance A: 2 of 6 metrics" in leaning and "did not show" in leaning
    tie = prose.answer_naive_vs_normalized(verdict(SAMPLE_METRICS, "A", quality(), "B", quality()), False)
    assert "did not show as a clear difference" in tie


def test_vae_quality_answer_the_user_reported():
    """The user's case: VAE FD 191 against 103.5 and 148.1 must not be explained as better."""
    vae, a, b = quality(fd=191.0, kid=0.12, confident=0.3), quality(fd=103.5, kid=0.05, confident=0.6), \
        quality(fd=148.1, kid=0.08, confident=0.45)
    text = prose.answer_vae_quality(verdict(SAMPLE_METRICS, "VAE", vae, "A", a),
                                    verdict(SAMPLE_METRICS, "VAE", vae, "B", b),
                                    {"VAE": 0.030, "A": 0.020, "B": 0.022}, quick=True)
    assert "A measured better than VAE" in text and "B measured better than VAE" in text
    assert "worse than both" in text and "more reliably" not in text and "Why: its KL term" not in text
    assert "less accurate than both" in text  # its MSE is the highest
    flipped = prose.answer_vae_quality(verdict(SAMPLE_METRICS, "VAE", a, "A", vae),
                                       verdict(SAMPLE_METRICS, "VAE", a, "B", b),
                                       {"VAE": 0.018, "A": 0.020, "B": 0.022}, quick=False)
    assert "better than both" in flipped and "Why: its KL term" in flipped
    assert "at least as accurate" in flipped
    between = prose.answer_vae_quality(verdict(SAMPLE_METRICS, "VAE", b, "A", a),
                                       verdict(SAMPLE_METRICS, "VAE", b, "B", vae), {}, quick=False)
    assert "between the autoencoders'" in between and "better than B, worse than A" in between
    mixed = prose.answer_vae_quality(verdict(SAMPLE_METRICS, "VAE", b, "A", b),
                                     verdict(SAMPLE_METRICS, "VAE", b, "B", a), {}, quick=False)
    assert "measure not clearly different from A and worse than B." in mixed


def test_vae_quality_on_balance_with_the_precision_recall_reading():
    """This run's pattern: the AEs win FD, KID, precision and confidence; the VAE wins recall."""
    vae = quality(fd=1.8, kid=0.16, precision=0.03, recall=0.034, confident=0.32, se=0.004)
    a = quality(fd=0.65, kid=0.047, precision=0.31, recall=0.0, confident=0.66, se=0.004)
    b = quality(fd=1.5, kid=0.13, precision=0.11, recall=0.0, confident=0.47, se=0.004)
    text = prose.answer_vae_quality(verdict(SAMPLE_METRICS, "VAE", vae, "A", a),
                                    verdict(SAMPLE_METRICS, "VAE", vae, "B", b), {}, quick=False)
    assert "on balance the VAE's samples measure worse than both" in text
    assert "its samples reach more of the data's variety" in text
    swapped = prose.answer_vae_quality(verdict(SAMPLE_METRICS, "VAE", a, "A", vae),
                                       verdict(SAMPLE_METRICS, "VAE", a, "B", vae), {}, quick=False)
    assert "on balance the VAE's samples measure better than both" in swapped
    assert "reach more of the data's variety" not in swapped


def test_input_dependence_and_the_basic_vaegan():
    depends, s = prose.input_dependence("VAE", own=0.02, other=0.09, se=0.001)
    assert depends and "carry information" in s
    depends, s = prose.input_dependence("basic VAE-GAN", own=0.091, other=0.092, se=0.002)
    assert not depends and "ignore the input" in s
    text = prose.answer_basic_vaegan("basic VAE-GAN", False, s, kl=0.01, reference="VAE", reference_kl=8.5,
                                     mse=0.09, reference_mse=0.03)
    assert "0.01 nats" in text and "3.0 times VAE's" in text and "asks for" in text
    other = prose.answer_basic_vaegan("basic VAE-GAN", True, "x.", kl=5.0, reference="VAE", reference_kl=8.5,
                                      mse=0.03, reference_mse=0.03)
    assert "Unexpected" in other and "asks for" not in other


def test_vaegan_variant_reads_the_discriminator_accuracies():
    easy = prose.answer_vaegan_variant(verdict(SAMPLE_METRICS, "GAN", BAD, "VAE", GOOD), (0.98, 0.97), quick=True)
    assert "VAE measured better than GAN" in easy and "wins easily" in easy and "did not improve" in easy
    good = prose.answer_vaegan_variant(verdict(SAMPLE_METRICS, "GAN", GOOD, "VAE", BAD), (0.55, 0.5), quick=False)
    assert "GAN measured better than VAE" in good and "expected gain" in good and "close to chance" in good
    # Another latent size or architecture: the gain is not put down to the adversarial term.
    unlike = prose.answer_vaegan_variant(verdict(SAMPLE_METRICS, "GAN", GOOD, "VAE", BAD), (0.55, 0.5), quick=False,
                                         differences=["a 16-D latent against 2", "convolutional networks"])
    assert "GAN measured better than VAE" in unlike and "expected gain" not in unlike
    assert "(a 16-D latent against 2 and convolutional networks), so the difference cannot be put down" in unlike
    worse = prose.answer_vaegan_variant(verdict(SAMPLE_METRICS, "GAN", BAD, "VAE", GOOD), (0.55, 0.5), quick=False,
                                        differences=["a 16-D latent against 2"])
    assert "did not improve" not in worse and "cannot be put down" in worse


# --- the 100 samples -------------------------------------------------------------------------------


def test_comment_on_samples_counts_and_flags_digits():
    names = [str(i) for i in range(10)]
    predicted = [10, 25, 10, 10, 2, 10, 10, 10, 8, 5]
    confident = [9, 24, 8, 8, 0, 7, 9, 9, 2, 4]
    text = prose.comment_on_samples(predicted, confident, names)
    assert "recognizes 80 (80%)" in text and "the other 20 are unrecognisable" in text
    assert "1: 24" in text  # the per-digit list
    assert "digit 1 (24) comes out more often" in text and "digit 8 (2) rarely" in text
    assert "digit 4 never" in text
    assert "Drawn poorly (fewer than half confident): 8 (2 of 8)" in text
    # digit 4 (2 best guesses, none confident) is in neither list, and the text says why
    assert "Too few samples to judge how cleanly (fewer than 3 whose best guess it is): 4 (0 of 2)." in text
    # Swap digits 1 and 4: the flags swap with them.
    p2, c2 = predicted[:], confident[:]
    p2[1], p2[4], c2[1], c2[4] = p2[4], p2[1], c2[4], c2[1]
    swapped = prose.comment_on_samples(p2, c2, names)
    assert "digit 4 (24) comes out more often" in swapped and "digit 1 never" in swapped


def test_comment_on_samples_when_all_digits_come_out_evenly():
    text = prose.comment_on_samples([10] * 10, [9] * 10, [str(i) for i in range(10)])
    assert "Every digit comes out confidently about as often as in the data" in text


def test_class_grid_comment_counts_each_rows_own_class_and_names_the_misreads():
    names = [str(i) for i in range(10)]
    best = [[c] * 5 for c in range(10)]
    sure = [[True] * 5 for _ in range(10)]
    best[4] = [9, 9, 4, 9, 7]  # the 4s' region decodes mostly 9s
    sure[7] = [True, False, True, True, True]
    text = prose.comment_on_class_grid(best, sure, names)
    assert "reads 46 (92%) as their row's digit, 45 of them with confidence > 0.9" in text
    assert "fewer than half the images read as their digit: 4 (1 of 5; the others read as 9 (3) and 7 (1))" in text
    assert "in every image: 0, 1, 2, 3, 5, 6, 8 and 9." in text  # not 4, not 7 (one unsure)
    best[4] = [4, 4, 4, 9, 9]
    assert "Every row shows its digit in at least half of its images." in prose.comment_on_class_grid(best, sure, names)
    garments = ["T-shirt/top", "Trouser"]
    text = prose.comment_on_class_grid([[1, 1], [1, 1]], [[True, True], [False, True]], garments, item="garment")
    assert "reads 2 (50%) as their row's garment, 1 of them" in text
    assert "T-shirt/top (0 of 2; the others read as Trouser (2))" in text


def test_training_description_follows_the_kl_direction():
    first = {"loss": 180.0, "recon": 170.0, "kl": 10.0}
    rising = prose.describe_training(first, {"loss": 110.0, "recon": 85.0, "kl": 25.0}, 3)
    assert "KL term rose from 10.0 to 25.0" in rising and "The usual trade" in rising
    falling = prose.describe_training(first, {"loss": 100.0, "recon": 92.0, "kl": 8.0}, 3, kl_peak=(2, 12.0))
    assert "KL term fell from 10.0 to 8.0" in falling and "peaked at 12.0 in epoch 2" in falling
    assert "The usual trade" not in falling
    overfit = prose.describe_training(first, {"loss": 100.0, "recon": 92.0, "kl": 8.0}, 3,
                                      test_last={"loss": 110.0})
    assert "10% above the training loss" in overfit
    # a change too small for one decimal is written with enough digits to show it
    tiny = prose.describe_training(first | {"kl": 0.0416}, {"loss": 100.0, "recon": 92.0, "kl": 0.0385}, 2)
    assert "KL term fell from 0.0416 to 0.0385" in tiny


# --- captions and tables ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["loss_curves", "latent_scatter", "class_grid", "samples", "reconstructions",
                                 "interpolation"])
def test_autoencoder_captions_never_speak_of_a_posterior(key):
    what, look = figure_caption(key, latent_dim=2, variational=False, prior="uniform over the training codes' box")
    assert "q(z|x)" not in what + look and "posterior" not in what + look
    what, look = figure_caption(key, latent_dim=2, variational=True)
    assert key in ("loss_curves", "class_grid", "samples") or "q(z|x)" in what + look


def test_captions_use_the_models_latent_size():
    what, look = figure_caption("reconstructions", latent_dim=16, variational=True, recon_mse=0.0123)
    assert "16-D" in look and "2-D" not in what + look and "0.0123" in what
    assert "not the details" in figure_caption("reconstructions", latent_dim=2, variational=True)[1]
    assert "images, 16-D, projected" in figure_caption("latent_scatter", latent_dim=16, variational=True)[0]
    assert "test images, coloured" in figure_caption("latent_scatter", latent_dim=2, variational=False)[0]
    assert figure_caption("manifold", latent_dim=16, variational=True) is None
    assert figure_caption("manifold", latent_dim=2, variational=True) is not None


def test_captions_follow_measured_facts():
    look = figure_caption("latent_scatter", latent_dim=2, variational=True, active_units=0)[1]
    assert "none of the 2 latent dimensions is active" in look and "clusters per class" not in look
    look = figure_caption("reconstructions", latent_dim=2, variational=True, input_dependent=False)[1]
    assert "not to depend on their input" in look and "keeps the class" not in look
    look = figure_caption("loss_curves", latent_dim=2, variational=True, adversarial=True)[1]
    assert "who is winning" in look and "KL term usually rises" not in look


def test_latent_size_note_only_where_sizes_differ():
    assert prose.latent_size_note({"A": 2, "B": 2}) is None
    note = prose.latent_size_note({"A": 2, "B": 2, "conv": 32})
    assert "2 for A and B and 32 for conv" in note and "not like-for-like" in note


def test_with_uncertainty_formats():
    assert prose.with_uncertainty(PRECISION, GOOD) == "0.700 ± 0.010"
    assert prose.with_uncertainty(CONFIDENT, GOOD) == "80.0% ± 1.0%"
    assert prose.with_uncertainty(FD, {"fd": 103.46}) == "103"
    assert prose.with_uncertainty(FD, {"fd": 0.5704, "fd_std": 0.0123}) == "0.570 ± 0.012"
    assert prose.with_uncertainty(FD, {}) == "—"


def test_leaders_follow_the_numbers():
    values = {"A": GOOD, "B": BAD, "C": quality(fd=51.0, kid=0.09, precision=0.45, recall=0.3, confident=0.5)}
    text = prose.leaders((FD, PRECISION), values)
    assert "lowest Fréchet distance: A (50.0), not clearly ahead of C" in text
    assert "highest precision: A (0.700), clearly ahead of C (0.450)" in text
    assert "Different models" not in text  # A leads both (FD only not clearly)
    split = prose.leaders((FD, CONFIDENT), {"A": quality(fd=50.0, confident=0.2),
                                            "B": quality(fd=150.0, confident=0.6)})
    assert "Different models clearly lead different metrics (A and B)" in split
    swapped = prose.leaders((FD,), {"A": BAD, "B": GOOD})
    assert swapped == "Per metric, the leader: lowest Fréchet distance: B (50.0), clearly ahead of A (150)."
    assert prose.leaders((FD,), {"A": GOOD}) is None


def test_comment_on_samples_says_whether_the_figure_is_a_typical_draw():
    names = [str(i) for i in range(10)]
    typical = prose.comment_on_samples([10] * 10, [5] * 10, names,
                                       population={"confident_share": 0.48, "confident_share_se": 0.011, "n": 2000})
    assert "the share is 48%, so these 100 are typical of the model" in typical
    better = prose.comment_on_samples([10] * 10, [5] * 10, names,
                                      population={"confident_share": 0.30, "confident_share_se": 0.01, "n": 2000})
    assert "a better draw than the model's average" in better
    worse = prose.comment_on_samples([10] * 10, [2] * 10, names,
                                     population={"confident_share": 0.45, "confident_share_se": 0.01, "n": 2000})
    assert "a worse draw" in worse


def test_comment_on_samples_names_the_cleanest_digits_when_none_is_clean():
    names = [str(i) for i in range(10)]
    text = prose.comment_on_samples([17, 14, 3, 6, 2, 7, 9, 10, 20, 12], [8, 12, 1, 4, 0, 2, 3, 3, 8, 5], names)
    assert "No digit is drawn cleanly" in text and "the cleanest: 1 (12 of 14) and 3 (4 of 6)" in text
    assert "Drawn poorly (fewer than half confident): 5 (2 of 7)" in text
