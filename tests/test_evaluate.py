"""Metrics on constructed embeddings with known answers (phiclip.evaluate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _embdir import ColourEncoder

from phiclip import evaluate as E


def _class_data(n_per_class: int, classes: int, dim: int, noise: float, seed: int = 0):
    """Points around orthogonal class directions: (x (n, dim), y (n,), directions (classes, dim))."""
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:classes]
    y = np.repeat(np.arange(classes), n_per_class)
    x = directions[y] + noise * rng.normal(size=(len(y), dim))
    return x.astype(np.float32), y, directions.astype(np.float32)


# --- zero-shot -------------------------------------------------------------------------------


def test_zero_shot_perfect_and_shuffled():
    x, y, w = _class_data(60, 10, 32, noise=0.05)
    perfect = E.zero_shot_metrics(x, w, y)
    assert perfect == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    shuffled = E.zero_shot_metrics(x, w, np.random.default_rng(1).permutation(y))
    assert abs(shuffled["acc1"] - 0.1) < 0.05
    assert abs(shuffled["acc5"] - 0.5) < 0.08
    assert abs(shuffled["mean_per_class_recall"] - 0.1) < 0.05


def test_zero_shot_known_answer():
    w = np.eye(6, dtype=np.float32)
    # image 0: class 0 first -> top1 hit. image 1 (true 1): ranked 3rd -> top5 only.
    # image 2 (true 2): ranked last of 6 -> neither. image 3 (true 0): top1 hit.
    x = np.array(
        [
            [9, 1, 0, 0, 0, 0],
            [5, 3, 0, 4, 0, 0],
            [1, 2, 0, 3, 4, 5],
            [2, 1, 0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
    y = np.array([0, 1, 2, 0])
    m = E.zero_shot_metrics(x, w, y)
    assert m["acc1"] == 0.5 and m["acc5"] == 0.75
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)  # classes present: 0, 1, 2


def test_zero_shot_top_k_uses_at_most_the_class_count_and_ties_by_index():
    w = np.eye(3, dtype=np.float32)
    assert E.zero_shot_metrics(np.array([[0, 0, 1.0]]), w, [2])["acc5"] == 1.0  # top-min(5, 3)
    # a constant encoder ties every class: the first index wins, as argmax
    tie = E.zero_shot_metrics(np.ones((3, 3)), np.ones((3, 3)), [0, 1, 2])
    assert tie["acc1"] == pytest.approx(1 / 3) and tie["mean_per_class_recall"] == pytest.approx(1 / 3)


def test_zero_shot_input_errors():
    w = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        E.zero_shot_metrics(np.eye(3), w, [0, 1, 3])
    with pytest.raises(ValueError, match="has 4 dims but the classifier 3"):
        E.zero_shot_metrics(np.ones((2, 4)), w, [0, 1])
    with pytest.raises(ValueError, match="one entry per row"):
        E.zero_shot_metrics(np.eye(3), w, [0, 1])
    with pytest.raises(ValueError, match="integer class indices"):
        E.zero_shot_metrics(np.eye(3), w, ["a", "b", "c"])
    with pytest.raises(ValueError, match="NaN"):
        E.zero_shot_metrics(np.full((1, 3), np.nan), w, [0])


def test_zero_shot_classifier_is_the_renormalised_mean_of_normalised_prompts():
    enc = ColourEncoder()
    templates = ["a photo of a {c}.", "a {c} and a red thing", lambda c: f"{c}!"]
    clf = E.zero_shot_classifier(enc, ["green", "blue"], templates)
    assert clf.shape == (2, 3)
    assert enc.text_calls == [["a photo of a green.", "a green and a red thing", "green!",
                               "a photo of a blue.", "a blue and a red thing", "blue!"]]
    # green: (0,1,0), (1,1,0)/sqrt2, (0,1,0) -> mean -> renormalised
    g = np.array([0, 1, 0]) * 2 + np.array([1, 1, 0]) / np.sqrt(2)
    np.testing.assert_allclose(clf[0], g / np.linalg.norm(g), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(clf, axis=1), 1.0, atol=1e-6)


def test_zero_shot_classifier_errors():
    with pytest.raises(ValueError, match="embeds images only"):
        E.zero_shot_classifier(ColourEncoder(text=False), ["red"], ["a {c}"])
    with pytest.raises(ValueError, match="no '\\{c\\}' placeholder"):
        E.zero_shot_classifier(ColourEncoder(), ["red"], ["a photo"])
    assert E.fill_template("a {} b", "cat") == "a cat b"


# --- kNN and linear probe --------------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["similarity", "majority"])
def test_knn_perfect_and_shuffled(weighting):
    x, y, _ = _class_data(80, 8, 24, noise=0.1)
    tr, te = E.stratified_split(y, 0.3, seed=0)
    perfect = E.knn_classify(x[tr], y[tr], x[te], y[te], k=10, weighting=weighting)
    assert perfect == {"acc1": 1.0, "mean_per_class_recall": 1.0}
    y_shuf = np.random.default_rng(2).permutation(y)
    chance = E.knn_classify(x[tr], y_shuf[tr], x[te], y_shuf[te], k=10, weighting=weighting)
    assert chance["acc1"] < 0.25  # chance is 1/8


def test_knn_known_answer_and_string_labels():
    train_x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 0.8]], np.float32)
    train_y = ["cat", "cat", "dog", "dog", "dog"]
    test_x = np.array([[1, 0.05], [0.05, 1], [0.7, 0.3]], np.float32)
    test_y = ["cat", "dog", "dog"]
    # k=3 majority: test 2 sees cat, cat, dog(0.2,0.8)? no: its 3 nearest are cat, cat, dog -> cat (wrong)
    m = E.knn_classify(train_x, train_y, test_x, test_y, k=3, weighting="majority")
    assert m["acc1"] == pytest.approx(2 / 3)
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.5) / 2)
    # k=5 majority: dogs outvote cats everywhere -> only the two dog rows are right
    m5 = E.knn_classify(train_x, train_y, test_x, test_y, k=5, weighting="majority")
    assert m5["acc1"] == pytest.approx(2 / 3) and m5["mean_per_class_recall"] == pytest.approx(0.5)
    # k=5 similarity-weighted (T=0.07): the close cats outweigh the far dogs for test 0
    w5 = E.knn_classify(train_x, train_y, test_x, test_y, k=5)
    assert w5["acc1"] == pytest.approx(2 / 3) and w5["mean_per_class_recall"] == pytest.approx(0.75)


def test_knn_majority_tie_goes_to_the_more_similar_class():
    train_x = np.array([[1, 0], [0, 1]], np.float32)
    pred = E.knn_predict(train_x, np.array([0, 1]), np.array([[0.2, 1.0]]), k=2, weighting="majority")
    assert pred.tolist() == [1]


def test_knn_errors():
    with pytest.raises(ValueError, match="weighting"):
        E.knn_predict(np.eye(2), np.array([0, 1]), np.eye(2), weighting="vote")
    with pytest.raises(ValueError, match="one label per row"):
        E.knn_classify(np.eye(2), [0], np.eye(2), [0, 1])
    with pytest.raises(ValueError, match="2 dims but test_x 3"):
        E.knn_classify(np.eye(2), [0, 1], np.eye(3), [0, 1, 2])


def test_linear_probe_perfect_and_shuffled():
    x, y, _ = _class_data(40, 5, 16, noise=0.15)
    tr, te = E.stratified_split(y, 0.3, seed=0)
    assert E.linear_probe(x[tr], y[tr], x[te], y[te]) == {"acc1": 1.0, "mean_per_class_recall": 1.0}
    y_shuf = np.random.default_rng(3).permutation(y)
    chance = E.linear_probe(x[tr], y_shuf[tr], x[te], y_shuf[te])
    assert chance["acc1"] < 0.4  # chance is 0.2


def test_linear_probe_solves_what_knn_cannot():
    # The label is the sign of one feature buried under large-variance noise features: a linear
    # model finds it, nearest neighbours (dominated by the noise) do not.
    rng = np.random.default_rng(4)
    n = 400
    signal = rng.choice([-1.0, 1.0], n)
    x = np.concatenate([signal[:, None] * 0.5 + 0.05 * rng.normal(size=(n, 1)), 3 * rng.normal(size=(n, 20))], axis=1)
    y = (signal > 0).astype(int)
    tr, te = E.stratified_split(y, 0.3, seed=0)
    lp = E.linear_probe(x[tr], y[tr], x[te], y[te])
    knn = E.knn_classify(x[tr], y[tr], x[te], y[te], k=10)
    assert lp["acc1"] >= 0.97 and knn["acc1"] < 0.75


def test_weight_decay_is_chosen_on_validation():
    # n ~ d with a weak signal in 5 of 400 dimensions: a strong decay generalises better than a weak one
    rng = np.random.default_rng(5)
    n, d = 400, 400
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) + 0.4 * (2 * y[:, None] - 1) * (np.arange(d) < 5)
    fit, val = E.stratified_split(y, 0.2, seed=0)  # the split fit_linear_probe makes

    def val_acc(wd):
        m = E.fit_linear_probe(x[fit], y[fit], 2, weight_decays=(wd,))
        return float(np.mean(m.predict(x[val]) == y[val]))

    weak, strong = val_acc(1e-6), val_acc(1.0)
    assert strong > weak
    model = E.fit_linear_probe(x, y, 2, weight_decays=(1e-6, 1.0), val_fraction=0.2, seed=0)
    assert model.weight_decay == 1.0 and model.val_acc1 == pytest.approx(strong, abs=0.03)  # same split, own scaling
    assert model.weight.shape == (d, 2) and model.bias.shape == (2,)
    single = E.fit_linear_probe(x, y, 2, weight_decays=(0.5,))
    assert single.weight_decay == 0.5 and single.val_acc1 is None


def test_weight_decay_ties_go_to_the_stronger_decay():
    x, y, _ = _class_data(30, 3, 8, noise=0.05)  # every decay is perfect on validation
    assert E.fit_linear_probe(x, y, 3, weight_decays=(1e-4, 1e-2, 1e-3)).weight_decay == 1e-2


# --- retrieval -------------------------------------------------------------------------------


def test_retrieval_perfect_and_shuffled():
    rng = np.random.default_rng(6)
    n_img, per = 200, 3
    img = rng.normal(size=(n_img, 64)).astype(np.float32)
    owner = np.repeat(np.arange(n_img), per)
    txt = img[owner] + 0.2 * rng.normal(size=(len(owner), 64)).astype(np.float32)
    perfect = E.retrieval_metrics(img, txt, owner)
    assert set(perfect) == {f"{side}_retrieval_recall@{k}" for side in ("image", "text") for k in (1, 5, 10)}
    assert all(v == 1.0 for v in perfect.values())
    shuffled = E.retrieval_metrics(img, txt, rng.permutation(owner))
    assert shuffled["image_retrieval_recall@10"] < 0.12  # chance: 10 / 200
    assert shuffled["text_retrieval_recall@1"] < 0.06  # chance: about 3 / 600 per slot, 3 positives


def test_retrieval_known_answer_any_positive_counts():
    img = np.eye(3, dtype=np.float32)
    txt = np.array(
        [
            [1.0, 0.0, 0.0],  # text 0 of image 0: its image first
            [0.0, 1.0, 0.2],  # text 1 of image 0: image 0 is ranked last (3rd)
            [0.0, 0.3, 1.0],  # text 2 of image 2: first
            [0.5, 0.4, 0.0],  # text 3 of image 1: image 0 first, its own image 2nd
        ],
        np.float32,
    )
    owner = [0, 0, 2, 1]
    m = E.retrieval_metrics(img, txt, owner, ks=(1, 2))
    assert m["image_retrieval_recall@1"] == 0.5 and m["image_retrieval_recall@2"] == 0.75
    # image queries (cosines): image 0 -> t0 1.0 first (hit; its other text t1 does not matter).
    # image 1 -> t1 0.98 (image 0's), then t3 0.62 -> rank 2. image 2 -> t2 0.96 first (hit).
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == 1.0


def test_retrieval_images_without_texts_are_candidates_not_queries():
    img = np.eye(4, dtype=np.float32)
    txt = np.eye(4, dtype=np.float32)[:2]
    m = E.retrieval_metrics(img, txt, [0, 1], ks=(1,))
    assert m == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0}


def test_retrieval_errors():
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        E.retrieval_metrics(np.eye(2), np.eye(2), [0, 2])
    with pytest.raises(ValueError, match="k must be >= 1"):
        E.retrieval_metrics(np.eye(2), np.eye(2), [0, 1], ks=(0,))


# --- splits ----------------------------------------------------------------------------------


def test_stratified_split_properties():
    labels = np.array(["a"] * 10 + ["b"] * 7 + ["c"] * 2 + ["d"])
    tr, te = E.stratified_split(labels, 0.3, seed=0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(labels)))
    assert len(set(tr) & set(te)) == 0
    counts = {c: int(np.sum(labels[te] == c)) for c in "abcd"}
    assert counts == {"a": 3, "b": 2, "c": 1, "d": 0}  # round(m * 0.3), >= 1 and <= m - 1; singletons stay in train
    tr2, te2 = E.stratified_split(labels, 0.3, seed=0)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    assert not np.array_equal(te, E.stratified_split(labels, 0.3, seed=1)[1])
    with pytest.raises(ValueError, match="between 0 and 1"):
        E.stratified_split(labels, 1.0)


def test_mean_per_class_recall_counts_true_classes_only():
    assert E.mean_per_class_recall(np.array([0, 0, 0, 1]), np.array([0, 0, 2, 2])) == pytest.approx((2 / 3 + 0) / 2)


# --- the runner ------------------------------------------------------------------------------


def _solid_folder(root, splits=None, per_class=3):
    """Solid-colour images, a folder per colour class (optionally under split folders)."""
    from PIL import Image

    base = {"red": (250, 0, 0), "green": (0, 250, 0), "blue": (0, 0, 250)}
    for split in splits or [None]:
        for name, rgb in base.items():
            d = root / split / name if split else root / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                tint = tuple(min(255, c + 30 * i) if c == 0 else c for c in rgb)
                Image.new("RGB", (8, 8), tint).save(d / f"{i}.png")
    return root


def test_evaluate_zeroshot_runner(tmp_path):
    data = _solid_folder(tmp_path / "d")
    r = E.evaluate(ColourEncoder(), "zeroshot", str(data), templates=["a photo of a {c}."])
    assert r["metrics"] == {"acc1": 1.0, "acc5": 1.0, "mean_per_class_recall": 1.0}
    assert r["task"] == "zeroshot" and r["model"] == "clip:/models/tiny" and r["details"]["num_classes"] == 3
    # class names are taken in label order (folders sorted: blue, green, red): a rotation scores 0
    rotated = E.evaluate(ColourEncoder(), "zeroshot", str(data), classnames=["green", "red", "blue"])
    assert rotated["metrics"]["acc1"] == 0.0
    names = tmp_path / "names.txt"
    names.write_text("# one per line\nblue\ngreen\nred\n")
    assert E.evaluate(ColourEncoder(), "zeroshot", str(data), classnames=str(names))["metrics"]["acc1"] == 1.0
    with pytest.raises(ValueError, match="2 class names given but .* has 3 classes"):
        E.evaluate(ColourEncoder(), "zeroshot", str(data), classnames=["a", "b"])
    with pytest.raises(ValueError, match="embeds images only"):
        E.evaluate(ColourEncoder(text=False), "zeroshot", str(data))


def test_evaluate_knn_and_linear_probe_runner(tmp_path):
    data = _solid_folder(tmp_path / "d", per_class=6)
    knn = E.evaluate(ColourEncoder(), "knn", str(data), k=3)
    assert knn["metrics"] == {"acc1": 1.0, "mean_per_class_recall": 1.0}
    d = knn["details"]
    assert d["split"] == "stratified 70%/30%, seed 0" and d["num_train"] + d["num_test"] == 18 and d["num_test"] == 6
    # an image-only encoder is fine for kNN and linear probe
    lp = E.evaluate(ColourEncoder(text=False), "linear-probe", str(data))
    assert lp["metrics"]["acc1"] == 1.0 and "weight_decay" in lp["details"]


def test_evaluate_uses_given_splits(tmp_path):
    data = _solid_folder(tmp_path / "d", splits=["train", "test"], per_class=2)
    r = E.evaluate(ColourEncoder(), "knn", str(data), k=1)
    assert r["details"]["split"] == "given (train / test)" and r["details"]["num_test"] == 6
    z = E.evaluate(ColourEncoder(), "zeroshot", str(data))
    assert z["split"] == "test" and z["details"]["num_images"] == 6
    sep = E.evaluate(ColourEncoder(), "knn", str(data), split="test", train_split="train", k=1)
    assert sep["details"]["split"] == "given (separate train data)" and sep["metrics"]["acc1"] == 1.0


def test_evaluate_retrieval_runner(tmp_path):
    from PIL import Image

    rows = ["image,caption"]
    for name, rgb in {"red": (250, 0, 0), "green": (0, 250, 0), "blue": (0, 0, 250)}.items():
        Image.new("RGB", (8, 8), rgb).save(tmp_path / f"{name}.png")
        rows += [f"{name}.png,a {name} square", f"{name}.png,something {name}"]
    (tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    r = E.evaluate(ColourEncoder(), "retrieval", str(tmp_path / "caps.csv"))
    assert r["details"] == {"num_images": 3, "num_texts": 6}
    assert r["metrics"]["image_retrieval_recall@1"] == 1.0 and r["metrics"]["text_retrieval_recall@1"] == 1.0
    with pytest.raises(ValueError, match="has no captions"):
        E.evaluate(ColourEncoder(), "retrieval", str(_solid_folder(tmp_path / "d")))


def test_evaluate_argument_errors(tmp_path):
    data = _solid_folder(tmp_path / "d")
    with pytest.raises(ValueError, match="not one of zeroshot, knn, linear-probe, retrieval"):
        E.evaluate(ColourEncoder(), "segmentation", str(data))
    with pytest.raises(ValueError, match="only apply to knn and linear-probe"):
        E.evaluate(ColourEncoder(), "zeroshot", str(data), train_split="train")
    with pytest.raises(ValueError, match="no such file"):
        E.evaluate(ColourEncoder(), "zeroshot", str(data), templates=str(tmp_path / "none.txt"))
    (tmp_path / "ints.csv").write_text("image,label\n" + "\n".join(f"d/red/{i}.png,{i % 2}" for i in range(3)) + "\n")
    with pytest.raises(ValueError, match="numbers without class names.*--classnames"):
        E.evaluate(ColourEncoder(), "zeroshot", str(tmp_path / "ints.csv"))


def test_evaluate_accepts_paths_and_loaded_data(tmp_path):
    from phiclip.inputs import load_data

    data = _solid_folder(tmp_path / "d")
    assert E.evaluate(ColourEncoder(), "zeroshot", data)["metrics"]["acc1"] == 1.0  # a Path
    assert E.evaluate(ColourEncoder(), "zeroshot", load_data(data))["metrics"]["acc1"] == 1.0
    single = _solid_folder(tmp_path / "one", per_class=1)
    with pytest.raises(ValueError, match="every class has a single image"):
        E.evaluate(ColourEncoder(), "knn", single)


# --- what eval leaves out --------------------------------------------------------------------


def test_a_bomb_and_an_empty_file_are_left_out_and_named(tmp_path):
    from _bad_images import add_bomb_and_empty

    data = _solid_folder(tmp_path / "d", per_class=4)
    bomb, empty = add_bomb_and_empty(data / "red")
    for task in ("zeroshot", "knn"):
        r = E.evaluate(ColourEncoder(), task, str(data), k=3)
        assert r["metrics"]["acc1"] == 1.0
        left = {item["source"]: item for item in r["left_out"]["items"]}
        assert r["left_out"]["count"] == 2 and set(left) == {str(bomb), str(empty)}
        assert "pixel limit" in left[str(bomb)]["reason"] and left[str(bomb)]["stage"] == "decode"
        assert "0 bytes" in left[str(empty)]["reason"] and left[str(empty)]["stage"] == "read"
    zs = E.evaluate(ColourEncoder(), "zeroshot", str(data))
    assert zs["details"]["num_images"] == 12  # the 14 files less the two left out
    # --max-pixels leaves out what is larger (here every 8x8 image): named, never fatal until none is left.
    with pytest.raises(ValueError, match="no image could be embedded.*pixel limit"):
        E.evaluate(ColourEncoder(), "zeroshot", str(data), max_pixels=10)


def test_cli_eval_lists_what_it_left_out(tmp_path):
    import json

    from _bad_images import add_bomb_and_empty
    from typer.testing import CliRunner

    from phiclip.cli import app
    from phiclip.testing import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip", image_size=32, patch_size=16)
    data = _solid_folder(tmp_path / "d", per_class=3)
    bomb, empty = add_bomb_and_empty(data / "green")
    args = ["eval", "--model", f"clip:{clip}", "--task", "knn", "--data", str(data), "--k", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Left out (all 2" in result.output and "bomb.png" in result.output and "empty.png" in result.output
    as_json = CliRunner().invoke(app, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    left = json.loads(as_json.stdout)["left_out"]
    assert left["count"] == 2 and {i["source"] for i in left["items"]} == {str(bomb), str(empty)}
    out = CliRunner().invoke(app, [*args, "--max-pixels", "40"])  # 8x8 = 64 pixels: every image left out
    assert out.exit_code == 1 and "no image could be embedded" in out.output and "Traceback" not in out.output


def test_prompt_names_are_words():
    assert E.prompt_name("blue_circle") == "blue circle"
    assert E.prompt_name("dark-blue__circle ") == "dark blue circle"
    assert E.prompt_name("_") == "_"


# --- the protocols: metrics scikit-learn has are equal to scikit-learn's ------------------------------


def _blobs(n: int = 120, d: int = 12, c: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=n)
    centres = rng.normal(size=(c, d))
    return (centres[y] + 0.9 * rng.normal(size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_protocol_equals_sklearn_with_the_same_weights(seed):
    neighbors = pytest.importorskip("sklearn.neighbors", reason="scikit-learn is not installed (dev extra)")
    x, y = _blobs(seed=seed)
    tr, te = E.stratified_split(y, 0.3, seed)
    for weighting, k in (("similarity", 10), ("majority", 7)):
        p = E.KnnProtocol(k=k, weighting=weighting)
        ours = E.knn_predict(x[tr], y[tr], x[te], k, weighting=weighting, temperature=p.temperature)
        weights = (lambda dist, t=p.temperature: np.exp(-dist / t)) if weighting == "similarity" else "uniform"
        ref = neighbors.KNeighborsClassifier(k, metric="cosine", algorithm="brute", weights=weights)
        expected = ref.fit(x[tr], y[tr]).predict(x[te])
        if weighting == "majority":  # sklearn breaks a tied vote by the lower class; ours by similarity
            votes = np.stack([np.bincount(r, minlength=4) for r in y[tr][ref.kneighbors(x[te], return_distance=False)]])
            clear = np.sort(votes, axis=1)[:, -1] > np.sort(votes, axis=1)[:, -2]
            ours, expected = ours[clear], expected[clear]
        assert np.array_equal(ours, expected), weighting
        assert p.run(x[tr], y[tr], x[te], y[te])["acc1"] == pytest.approx(
            float(np.mean(E.knn_predict(x[tr], y[tr], x[te], k, weighting=weighting) == y[te]))
        )


def test_accuracy_and_balanced_accuracy_equal_sklearn():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed (dev extra)")
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert E.mean_per_class_recall(y, pred) == pytest.approx(metrics.balanced_accuracy_score(y, pred), abs=1e-12)
    x, labels = _blobs()
    tr, te = E.stratified_split(labels, 0.3, 0)
    got = E.KnnProtocol(k=5).run(x[tr], labels[tr], x[te], labels[te])
    pred = E.knn_predict(x[tr], labels[tr], x[te], 5)
    assert got["acc1"] == pytest.approx(metrics.accuracy_score(labels[te], pred), abs=1e-12)
    assert got["mean_per_class_recall"] == pytest.approx(metrics.balanced_accuracy_score(labels[te], pred), abs=1e-12)


def test_zero_shot_and_retrieval_equal_sklearn_top_k_accuracy():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed (dev extra)")
    rng = np.random.default_rng(1)
    img = rng.normal(size=(40, 8)).astype(np.float32)
    classes = rng.normal(size=(9, 8)).astype(np.float32)
    labels = rng.integers(0, 9, 40)
    zs = E.ZeroShotProtocol().run(img, classes, labels)
    logits = E.l2_normalize(img) @ E.l2_normalize(classes).T
    assert zs["acc1"] == pytest.approx(metrics.top_k_accuracy_score(labels, logits, k=1, labels=range(9)))
    assert zs["acc5"] == pytest.approx(metrics.top_k_accuracy_score(labels, logits, k=5, labels=range(9)))
    txt = rng.normal(size=(60, 8)).astype(np.float32)
    owner = rng.integers(0, 40, 60)
    r = E.RetrievalProtocol().run(img, txt, owner)
    scores = E.l2_normalize(txt) @ E.l2_normalize(img).T
    for k in (1, 5, 10):
        ref = metrics.top_k_accuracy_score(owner, scores, k=k, labels=range(40))
        assert r[f"image_retrieval_recall@{k}"] == pytest.approx(ref), k


def test_clustering_protocol_equals_sklearn_on_its_assignment():
    metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is not installed (dev extra)")
    from phiclip.collection import kmeans

    x, y = _blobs(n=200)
    p = E.ClusteringProtocol(seed=3)
    got = p.run(x, y)
    assign = kmeans(x, 4, seed=3, niter=p.niter, nredo=p.nredo).assignment
    assert got["v_measure"] == pytest.approx(metrics.v_measure_score(y, assign), abs=1e-12)
    assert got["nmi"] == pytest.approx(metrics.normalized_mutual_info_score(y, assign), abs=1e-12)
    assert "k = number of classes" in p.describe() and "V-measure" in p.describe()


def test_linear_probe_k_shot_draws_and_protocol_record():
    x, y = _blobs(n=160)
    tr, te = E.stratified_split(y, 0.3, 0)
    p = E.LinearProbeProtocol(shots=4, seeds=3, weight_decays=(1e-3,))
    metrics, details = p.run(x[tr], y[tr], x[te], y[te])
    assert len(details["acc1_per_draw"]) == 3 and metrics["acc1"] == pytest.approx(np.mean(details["acc1_per_draw"]))
    assert "acc1_std" in metrics and "4 per class x 3 seeded draws" in p.describe()
    assert E._k_shot(y[tr], 4, 0).size == 16 and not np.array_equal(E._k_shot(y[tr], 4, 0), E._k_shot(y[tr], 4, 1))
    mieb = E.LinearProbeProtocol.mieb()
    assert (mieb.shots, mieb.seeds) == (16, 5)
    full, _ = E.LinearProbeProtocol().run(x[tr], y[tr], x[te], y[te])
    assert full == E.linear_probe(x[tr], y[tr], x[te], y[te])  # the protocol is the function, not a copy
    rec = E.protocol_record(p, "stratified 70%/30%, seed 0", {"train": len(tr), "test": len(te)})
    assert rec["name"] == "linear-probe" and rec["settings"]["shots"] == 4 and rec["n"]["test"] == len(te)
    assert json.loads(json.dumps(rec)) == rec


def test_classification_split_uses_given_splits_else_stratified():
    labels = np.array([0, 1] * 10)
    splits = ["train"] * 14 + ["test"] * 6
    tr, te, how = E.classification_split(labels, E.SplitProtocol(), splits)
    assert how == "given (train / test)" and list(te) == list(range(14, 20))
    tr, te, how = E.classification_split(labels, E.SplitProtocol(0.3, 2))
    assert how == "stratified 70%/30%, seed 2" and len(te) == 6
    rows, where = E.scored_rows(20, splits)
    assert where == "the test split" and len(rows) == 6
