"""simcore.isc.metrics.evaluate: hand-computed cases and a brute-force cross-check."""
import math
import random

import numpy as np
import pytest

from simcore.isc.metrics import evaluate, read_ground_truth, read_predictions, write_predictions, FileFormatError


def test_hand_computed_micro_ap_and_ranks():
    gt = [("q1", "r1"), ("q2", "r2"), ("q3", "r3"), ("q4", "")]      # q4 has no match: 3 pairs
    preds = [("q1", "r1", 0.9),     # TP
             ("q2", "r9", 0.8),     # FP
             ("q2", "r2", 0.7),     # TP
             ("q4", "r1", 0.6)]     # FP
    m = evaluate(preds, gt)
    # Order TP FP TP FP: true positives 1 1 2 2, precision 1, 1/2, 2/3, 1/2, recall 1/3, 1/3, 2/3, 2/3.
    # µAP = (1/3)·1 + 0·(1/2) + (1/3)·(2/3) + 0·(1/2) = 1/3 + 2/9 = 5/9; (q3, r3) is never predicted.
    assert m.micro_ap == pytest.approx(5 / 9, abs=1e-12)
    np.testing.assert_allclose(m.precisions, [1, 1 / 2, 2 / 3, 1 / 2])
    np.testing.assert_allclose(m.recalls, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    # Precision >= 0.9 only after the first prediction: recall 1/3 at threshold 0.9.
    assert m.recall_at_p90 == pytest.approx(1 / 3)
    assert m.threshold_at_p90 == pytest.approx(0.9)
    # Ranks: (q1, r1) is q1's best -> 0; (q2, r2) has one better q2 prediction -> 1; (q3, r3) unpredicted.
    assert m.recall_at_rank1 == pytest.approx(1 / 3)
    assert m.recall_at_rank10 == pytest.approx(2 / 3)
    assert (m.num_predictions, m.num_ground_truth, m.num_true_positives) == (4, 3, 2)


def test_ties_are_ordered_negatives_first():
    gt = [("q1", "r1")]
    preds = [("q1", "r1", 0.5), ("q1", "r7", 0.5)]
    m = evaluate(preds, gt)
    # Worst case: the FP comes first: precision 0/1 then 1/2, recall 0 then 1: µAP = 0·0 + 1·(1/2) = 1/2
    # (it would be 1.0 with the positive first). Precision never reaches 0.9: recall@P90 = 0.
    assert m.micro_ap == pytest.approx(0.5)
    assert m.recall_at_p90 == 0.0 and m.threshold_at_p90 is None
    # Per query, ties count against the positive too: 2 predictions with score >= 0.5 -> rank 1.
    assert m.recall_at_rank1 == 0.0
    assert m.recall_at_rank10 == 1.0


def test_constant_scores_earn_nothing_more_than_chance_order():
    gt = [(f"q{i}", f"r{i}") for i in range(4)]
    preds = [(f"q{i}", f"r{j}", 1.0) for i in range(4) for j in range(4)]   # 16 predictions, 4 positives
    m = evaluate(preds, gt)
    # All tied: 12 negatives first, then the 4 positives: precisions 1/13, 2/14, 3/15, 4/16 at recall steps 1/4.
    expected = 0.25 * (1 / 13 + 2 / 14 + 3 / 15 + 4 / 16)
    assert m.micro_ap == pytest.approx(expected)


def test_perfect_predictions():
    gt = [(1, 10), (2, 20), (3, 30)]                                # int ids work too
    preds = [(1, 10, 3.0), (2, 20, 2.0), (3, 30, 1.0), (3, 10, 0.5)]
    m = evaluate(preds, gt)
    assert m.micro_ap == pytest.approx(1.0)
    assert m.recall_at_p90 == pytest.approx(1.0)
    assert m.threshold_at_p90 == pytest.approx(1.0)
    assert m.recall_at_rank1 == 1.0


def test_unpredicted_ground_truth_lowers_recall():
    gt = [("a", "x"), ("b", "y")]
    m = evaluate([("a", "x", 1.0)], gt)
    # One TP at precision 1, recall 1/2: µAP = 1/2; recall@P90 = 1/2.
    assert m.micro_ap == pytest.approx(0.5)
    assert m.recall_at_p90 == pytest.approx(0.5)
    assert m.recall_at_rank1 == pytest.approx(0.5)


def test_recall_at_p90_takes_the_highest_recall_with_enough_precision():
    gt = [(f"q{i}", "r") for i in range(10)]
    # 9 TPs, then 1 FP, then 1 TP: precision after 11 = 10/11 = 0.909 >= 0.9 -> recall 10/10.
    preds = [(f"q{i}", "r", 1.0 - 0.01 * i) for i in range(9)] + [("q0", "bad", 0.5), ("q9", "r", 0.4)]
    m = evaluate(preds, gt)
    assert m.recall_at_p90 == pytest.approx(1.0)
    assert m.threshold_at_p90 == pytest.approx(0.4)
    # µAP: 9 steps of 1/10 at precision 1, one of 1/10 at 10/11.
    assert m.micro_ap == pytest.approx(0.9 + 0.1 * 10 / 11)


def test_duplicates_are_rejected_naming_the_pair():
    with pytest.raises(ValueError, match=r"duplicate.*'q1'.*'r1'"):
        evaluate([("q1", "r1", 0.3), ("q1", "r1", 0.2)], [("q1", "r1")])


def test_bad_inputs():
    with pytest.raises(ValueError, match="no .query, reference. pairs"):
        evaluate([("q", "r", 1.0)], [("q", "")])
    with pytest.raises(ValueError, match="NaN"):
        evaluate([("q", "r", float("nan"))], [("q", "r")])
    m = evaluate([], [("q", "r")])
    assert m.micro_ap == 0.0 and m.recall_at_p90 == 0.0 and m.recall_at_rank10 == 0.0


def brute_force(preds, gt):
    """Straight from the definitions, with Python loops."""
    pairs = {(q, r) for q, r in gt if r not in ("", None)}
    rows = [(s, (q, r) in pairs, q, r) for q, r, s in preds]
    rows.sort(key=lambda t: (-t[0], t[1]))                 # score desc, False (negative) first
    tp, ap, prev_r, best_r = 0, 0.0, 0.0, 0.0
    for i, (s, pos, _, _) in enumerate(rows, start=1):
        tp += pos
        p, r = tp / i, tp / len(pairs)
        ap += (r - prev_r) * p
        prev_r = r
        if p >= 0.9:
            best_r = max(best_r, r)
    r1 = r10 = 0
    for q, r in pairs:
        mine = [(s, rr) for qq, rr, s in preds if qq == q]
        hit = [s for s, rr in mine if rr == r]
        if hit:
            rank = sum(1 for s, _ in mine if s >= hit[0]) - 1
            r1 += rank < 1
            r10 += rank < 10
    return ap, best_r, r1 / len(pairs), r10 / len(pairs)


@pytest.mark.parametrize("trial", range(25))
def test_matches_brute_force_on_random_cases(trial, seed):
    rng = random.Random(seed * 100 + trial)
    nq, nr = rng.randint(1, 12), rng.randint(1, 15)
    gt = []
    for q in range(nq):
        if rng.random() < 0.6:
            for r in rng.sample(range(nr), rng.randint(1, min(2, nr))):
                gt.append((f"q{q}", f"r{r}"))
        else:
            gt.append((f"q{q}", ""))
    if not any(r for _, r in gt):
        gt.append(("q0", "r0"))
    preds = []
    for q in range(nq):
        for r in rng.sample(range(nr), rng.randint(0, nr)):
            s = rng.choice([0.1, 0.2, 0.5, 0.5, 0.9]) if rng.random() < 0.5 else rng.random()   # many ties
            preds.append((f"q{q}", f"r{r}", s))
    rng.shuffle(preds)
    m = evaluate(preds, gt)
    ap, rp90, r1, r10 = brute_force(preds, gt)
    assert m.micro_ap == pytest.approx(ap, abs=1e-12)
    assert m.recall_at_p90 == pytest.approx(rp90, abs=1e-12)
    assert m.recall_at_rank1 == pytest.approx(r1)
    assert m.recall_at_rank10 == pytest.approx(r10)
    assert 0.0 <= m.micro_ap <= 1.0


def test_csv_round_trip_and_errors(tmp_path):
    p = tmp_path / "pred.csv"
    write_predictions(p, [("q1", "r1", 0.25), ("q2", "r3", -1.5)])
    assert read_predictions(p) == [("q1", "r1", 0.25), ("q2", "r3", -1.5)]
    g = tmp_path / "gt.csv"
    g.write_text("query_id,reference_id\nq1,r1\nq2,\n")
    assert read_ground_truth(g) == [("q1", "r1"), ("q2", "")]
    bad = tmp_path / "bad.csv"
    bad.write_text("query_id,reference_id,score\nq1,r1,abc\n")
    with pytest.raises(FileFormatError, match=r"bad.csv: line 2: score 'abc' is not a number"):
        read_predictions(bad)
    bad.write_text("q1,r1\n")
    with pytest.raises(FileFormatError, match=r"bad.csv: line 1: expected 3 columns"):
        read_predictions(bad)


def test_csv_readers_reject_binary_and_garbage_files(tmp_path):
    binary = tmp_path / "desc.h5"
    binary.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 64)
    huge = tmp_path / "huge.csv"
    huge.write_text("q1,r1," + "9" * 200_000 + "\n")                # past the csv module's field limit
    for reader in (read_predictions, read_ground_truth):
        with pytest.raises(FileFormatError, match=r"desc.h5: not a UTF-8 text file"):
            reader(binary)
        with pytest.raises(FileFormatError, match=r"huge.csv: line 1: not a CSV"):
            reader(huge)
    long_score = tmp_path / "long.csv"
    long_score.write_text("q1,r1," + "x" * 1000 + "\n")
    with pytest.raises(FileFormatError) as e:
        read_predictions(long_score)
    assert "is not a number" in str(e.value) and len(str(e.value)) < 200     # the field is cut short


def test_csv_readers_accept_a_byte_order_mark(tmp_path):
    p, g = tmp_path / "pred.csv", tmp_path / "gt.csv"
    p.write_bytes("\ufeffquery_id,reference_id,score\nq1,r1,0.5\n".encode("utf-8"))
    g.write_bytes("\ufeffquery_id,reference_id\nq1,r1\n".encode("utf-8"))
    assert read_predictions(p) == [("q1", "r1", 0.5)]
    assert read_ground_truth(g) == [("q1", "r1")]


def test_plot_writes_a_png(tmp_path):
    m = evaluate([("q1", "r1", 0.9), ("q2", "r1", 0.3)], [("q1", "r1"), ("q2", "r2")])
    out = tmp_path / "pr.png"
    m.plot(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isfinite(m.micro_ap)
