"""Tests for klaus.runtime: the embedded model on the example photos, and plain ONNX models."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import EXAMPLES, TINY_CLASSES, TINY_PREPROCESS, make_tiny_onnx, tiny_klaus
from klaus import compression, format
from klaus.compression.recipe import FP16
from klaus.errors import KlausFormatError, KlausImageError, KlausModelError
from klaus.labels import plain_label_rows
from klaus.preprocess import Preprocess, prepare
from klaus.runtime import Classifier, default_model_path, softmax

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CAT = EXAMPLES / "cat.jpg"


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier()


def test_default_model_is_shipped():
    path = default_model_path()
    assert path.is_file() and path.name == "efficientnet-lite0.klaus"
    model = format.read_model(path)
    assert len(model.labels) == 1000
    assert model.preprocess.input_size == 224


@pytest.mark.parametrize("crops", [1, 10])
def test_cat_is_a_cat(classifier, crops):
    result = classifier.classify(CAT, crops=crops)
    assert result.predictions[0].index in CAT_CLASSES
    assert len(result.predictions) == 5
    assert [p.rank for p in result.predictions] == [1, 2, 3, 4, 5]
    probs = [p.probability for p in result.predictions]
    assert probs == sorted(probs, reverse=True)
    # Most of the probability mass of the top 5 is on cats.
    assert sum(p.probability for p in result.predictions if p.index in CAT_CLASSES) > 0.5
    assert result.path == str(CAT)
    assert result.elapsed_ms > 0


@pytest.mark.parametrize(
    "photo,expected",
    [
        ("coffee.jpg", {967, 968, 504}),
        ("rocket.jpg", {812, 657, 744}),
    ],  # espresso/cup/coffee mug; space shuttle/missile/projectile
)
def test_other_examples(classifier, photo, expected):
    top = classifier.classify(EXAMPLES / photo)
    assert top.predictions[0].index in expected, top.predictions[0]


def test_probabilities_sum_to_one(classifier):
    images = [EXAMPLES / name for name in ("cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg")]
    for crops in (1, 10):
        probs = classifier.probabilities(images, crops=crops)
        assert probs.shape == (4, 1000)
        assert np.all(probs >= 0)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # Batched and one-at-a-time agree.
    single = classifier.probabilities([images[1]])
    np.testing.assert_allclose(single[0], classifier.probabilities(images)[1], atol=1e-5)


def test_classify_bytes_and_file_objects(classifier):
    data = CAT.read_bytes()
    from_path = classifier.classify(CAT)
    from_bytes = classifier.classify(data)
    from_file = classifier.classify(io.BytesIO(data))
    assert from_bytes.path == "<image>" and from_file.path == "<image>"
    for other in (from_bytes, from_file):
        assert [p.index for p in other.predictions] == [p.index for p in from_path.predictions]
        np.testing.assert_allclose(
            [p.probability for p in other.predictions], [p.probability for p in from_path.predictions], rtol=1e-6
        )


def test_top_k(classifier):
    assert len(classifier.classify(CAT, top=1).predictions) == 1
    assert len(classifier.classify(CAT, top=1000).predictions) == 1000
    assert len(classifier.classify(CAT, top=5000).predictions) == 1000  # clamped


@pytest.mark.parametrize("top", [0, -1])
def test_top_below_one_is_refused(top):
    """Asking for no predictions is a caller's mistake, not a request for one."""
    clf = Classifier(tiny_klaus())
    with pytest.raises(ValueError, match=r"^top must be >= 1$"):
        clf.classify(CAT, top=top)
    with pytest.raises(ValueError, match=r"^top must be >= 1$"):
        clf.top(clf.probabilities([CAT])[0], top=top)


def test_imagenet_hierarchy(classifier):
    for p in classifier.classify(CAT).predictions:
        assert p.hierarchy[0] == "entity"
        assert p.hierarchy[-1] == p.label
        assert len(p.hierarchy) > 3
        assert p.wnid.startswith("n") and len(p.wnid) == 9
    top = classifier.classify(CAT).predictions[0]
    assert "cat" in top.hierarchy and "animal" in top.hierarchy
    d = top.to_dict()
    assert set(d) == {"rank", "index", "wnid", "label", "probability", "hierarchy"}
    assert d["hierarchy"] == list(top.hierarchy)


def test_bad_images_raise_image_errors(classifier, tmp_path):
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(CAT.read_bytes()[:2000])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for bad in (not_image, truncated, empty, tmp_path / "missing.jpg", tmp_path, b"garbage bytes"):
        with pytest.raises(KlausImageError):
            classifier.classify(bad)


def test_classifier_on_plain_onnx(tiny_onnx_path):
    names = [f"thing {i}" for i in range(TINY_CLASSES)]
    # Without labels a 10-class model cannot be given ImageNet names.
    with pytest.raises(KlausModelError, match="--labels"):
        Classifier(tiny_onnx_path, preprocess=TINY_PREPROCESS)
    clf = Classifier(tiny_onnx_path, preprocess=TINY_PREPROCESS, labels=plain_label_rows(names))
    assert clf.name == "tiny" and clf.preprocess == TINY_PREPROCESS
    result = clf.classify(CAT, top=3)
    assert len(result.predictions) == 3
    # Probabilities are the softmax of the ONNX model's logits on the prepared input.
    x = prepare(CAT, TINY_PREPROCESS)
    session = ort.InferenceSession(make_tiny_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
    expected = softmax(session.run(None, {"input": x})[0])[0]
    order = np.argsort(-expected, kind="stable")[:3]
    assert [p.index for p in result.predictions] == list(order)
    np.testing.assert_allclose([p.probability for p in result.predictions], expected[order], rtol=1e-5)
    top = result.predictions[0]
    assert top.label == names[top.index] and top.wnid == ""
    assert top.hierarchy == ()  # no WordNet path for plain labels


def test_classifier_on_klaus_file_and_object(tiny_klaus_path):
    model = tiny_klaus()
    from_file = Classifier(tiny_klaus_path)
    from_object = Classifier(model)
    assert from_file.preprocess == TINY_PREPROCESS == from_object.preprocess
    a = from_file.probabilities([CAT], crops=10)
    b = from_object.probabilities([CAT], crops=10)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, TINY_CLASSES)
    assert next(p.label for p in from_file.classify(CAT).predictions).startswith("class ")


def test_classifier_rejects_bad_models(tmp_path):
    garbage = tmp_path / "garbage.klaus"
    garbage.write_bytes(b"definitely not sqlite" * 50)
    with pytest.raises(KlausFormatError):
        Classifier(garbage)
    with pytest.raises(KlausFormatError):
        Classifier(tmp_path / "missing.klaus")
    with pytest.raises(KlausModelError):
        Classifier(tmp_path / "missing.onnx")


def test_fixed_batch_onnx_model(tmp_path, tiny_onnx_path):
    """A model exported with batch 1 still classifies ten crops (run one by one)."""
    model = make_tiny_onnx()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "fixed.onnx"
    onnx.save(model, path)
    labels = plain_label_rows([str(i) for i in range(TINY_CLASSES)])
    fixed = Classifier(path, preprocess=TINY_PREPROCESS, labels=labels)
    dynamic = Classifier(tiny_onnx_path, preprocess=TINY_PREPROCESS, labels=labels)
    images = [CAT, EXAMPLES / "coffee.jpg"]
    probs = fixed.probabilities(images, crops=10)
    assert probs.shape == (2, TINY_CLASSES)
    np.testing.assert_allclose(probs, dynamic.probabilities(images, crops=10), rtol=1e-5, atol=1e-7)


def _mismatched_model():
    """A .klaus model whose preprocessing (224 px) contradicts its graph's static 32x32 input."""
    # compress_onnx refuses such a pair, so the contradiction is written into the model afterwards,
    # as a hand-edited or foreign file could carry it.
    model = compression.compress_onnx(
        make_tiny_onnx(),
        FP16,
        preprocess=TINY_PREPROCESS,
        labels=plain_label_rows([str(i) for i in range(TINY_CLASSES)]),
        card=compression.ModelCard("mismatched"),
    )
    return dataclasses.replace(model, preprocess=Preprocess(input_size=224))


def test_preprocessing_that_cannot_feed_the_graph_is_refused_up_front():
    """A model whose preprocessing contradicts its graph's input: one KlausModelError when it is loaded."""
    with pytest.raises(
        KlausModelError,
        match=r"input 'input' has shape \(\?, 3, 32, 32\), but the preprocessing makes \(N, 3, 224, 224\)",
    ):
        Classifier(_mismatched_model())


def test_runtime_failures_are_klaus_errors(monkeypatch):
    """ONNX Runtime failing on an input must surface as a KlausError naming the model, not an ORT exception."""
    clf = Classifier(tiny_klaus())

    def broken(*args, **kwargs):
        raise ort.capi.onnxruntime_pybind11_state.Fail("[ONNXRuntimeError] : 1 : FAIL : something\nmore detail")

    monkeypatch.setattr(clf, "_session", type("S", (), {"run": staticmethod(broken)})())
    with pytest.raises(
        KlausModelError, match=r"^tiny: ONNX Runtime failed \(\[ONNXRuntimeError\] : 1 : FAIL : something\)$"
    ):
        clf.classify(CAT)


def test_classifier_recognizes_onnx_by_content(tmp_path, tiny_onnx_path):
    """compress tells .klaus from ONNX by content; the classifier should not depend on a lower-case suffix."""
    upper = tmp_path / "TINY.ONNX"
    upper.write_bytes(tiny_onnx_path.read_bytes())
    labels = plain_label_rows([str(i) for i in range(TINY_CLASSES)])
    clf = Classifier(upper, preprocess=TINY_PREPROCESS, labels=labels)
    assert len(clf.classify(CAT).predictions) == 5


# ---------------------------------------------------------------- errors name the model file


def test_empty_onnx_model_is_a_model_error(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(KlausModelError, match=f"^{empty}: not an ONNX model"):
        Classifier(str(empty))


def test_onnx_model_errors_name_the_file(tmp_path, monkeypatch):
    ten = tmp_path / "ten.onnx"
    onnx.save(make_tiny_onnx(), ten)
    with pytest.raises(KlausModelError, match=f"^{ten}: the model has 10 outputs"):
        Classifier(str(ten))
    model = make_tiny_onnx(classes=1000)
    model.graph.node[0].op_type = "NoSuchOp"
    unknown = tmp_path / "unknown.onnx"
    onnx.save(model, unknown)
    with pytest.raises(KlausFormatError, match=f"^{unknown}: node '/stem/Conv' uses NoSuchOp, which is not among"):
        Classifier(str(unknown))  # an ONNX file obeys the operator policy of .klaus graphs
    monkeypatch.setenv("KLAUS_TRUST_MODEL", "1")
    with pytest.raises(KlausModelError, match=f"^{unknown}: ONNX Runtime cannot load the model \\(.*NoSuchOp"):
        Classifier(str(unknown))


def test_run_errors_name_the_model_file_not_its_name(tmp_path):
    model = compression.compress_onnx(
        make_tiny_onnx(),
        FP16,
        preprocess=TINY_PREPROCESS,
        labels=plain_label_rows([f"c{i}" for i in range(TINY_CLASSES)]),
        card=compression.ModelCard("inner"),
    )
    path = tmp_path / "outer.klaus"
    compression.write(model, path)
    clf = Classifier(str(path))
    assert clf.name == "inner" and clf.where == str(path)
    clf._session = type("S", (), {"run": staticmethod(lambda *a, **k: 1 / 0)})()
    with pytest.raises(KlausModelError, match=f"^{path}: ONNX Runtime failed"):
        clf.classify(CAT)
    compression.write(dataclasses.replace(model, preprocess=Preprocess(input_size=48)), path)
    with pytest.raises(KlausModelError, match=f"^{path}: input 'input' has shape"):
        Classifier(str(path))


def test_softmax_of_non_finite_logits_is_nan_without_warnings():
    import warnings

    from klaus.runtime import softmax

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        probs = softmax(np.array([[np.inf, 1.0, np.inf], [1.0, 2.0, 3.0]], np.float32))
    assert np.isnan(probs[0]).all() and np.isclose(probs[1].sum(), 1.0)


def test_nan_scores_are_an_error_for_the_image(tmp_path):
    """A model whose output is NaN for an image: a KlausModelError naming the image and the model."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 1000), np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["m"]),
        helper.make_node("Abs", ["m"], ["a"]),
        helper.make_node("Neg", ["a"], ["n"]),
        helper.make_node("Sqrt", ["n"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1000])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "nan.onnx"
    onnx.save(model, path)
    clf = Classifier(str(path))
    assert np.isnan(clf.probabilities([CAT])).all()  # what the model really gives
    with pytest.raises(KlausModelError, match=f"^{CAT}: the model {path} gives NaN"):
        clf.classify(CAT)


# ---------------------------------------------------------------- the graph's declared input


def _ten_labels():
    return plain_label_rows([str(i) for i in range(TINY_CLASSES)])


def _nhwc(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network taking (N, 32, 32, 3): a Transpose in front."""
    from onnx import helper

    model.graph.node.insert(0, helper.make_node("Transpose", ["image"], ["input"], perm=[0, 3, 1, 2]))
    del model.graph.input[:]
    model.graph.input.append(helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["batch", 32, 32, 3]))
    return model


def test_onnx_model_is_fed_at_its_declared_input_size(tmp_path, tiny_onnx_path):
    """A plain ONNX file with a fixed 32x32 input is preprocessed at 32, not the default 224."""
    clf = Classifier(tiny_onnx_path, labels=_ten_labels())
    assert clf.preprocess == Preprocess(input_size=32)
    explicit = Classifier(tiny_onnx_path, preprocess=TINY_PREPROCESS, labels=_ten_labels())
    np.testing.assert_array_equal(clf.probabilities([CAT]), explicit.probabilities([CAT]))
    assert clf.classify(CAT).predictions == explicit.classify(CAT).predictions
    # Channels last: (N, S, S, 3) is taken as NHWC at its size, with the same scores.
    path = tmp_path / "nhwc.onnx"
    onnx.save(_nhwc(make_tiny_onnx()), path)
    nhwc = Classifier(path, labels=_ten_labels())
    assert (nhwc.preprocess.input_size, nhwc.preprocess.layout) == (32, "NHWC")
    np.testing.assert_allclose(
        nhwc.probabilities([CAT], crops=10), explicit.probabilities([CAT], crops=10), rtol=1e-5, atol=1e-7
    )
    # No fixed size: the default 224, as before.
    dynamic = make_tiny_onnx()
    for i in (2, 3):
        dynamic.graph.input[0].type.tensor_type.shape.dim[i].dim_param = "side"
    path = tmp_path / "dynamic.onnx"
    onnx.save(dynamic, path)
    assert Classifier(path, labels=_ten_labels()).preprocess == Preprocess()


def _with_input_dims(tmp_path, name: str, **dims: int):
    model = make_tiny_onnx()
    shape = model.graph.input[0].type.tensor_type.shape.dim
    for index, value in dims.items():
        shape[int(index[1:])].dim_value = value
    if "d0" in dims:
        model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = dims["d0"]
    path = tmp_path / name
    onnx.save(model, path)
    return path


def test_a_fixed_batch_graph_runs_in_padded_batches_of_its_size(tmp_path):
    """A graph exported without dynamic axes takes exactly N images a call: 1 photo or 10 crops
    are fed in groups of N, the last one padded, with the scores of the dynamic graph."""
    batch4 = Classifier(_with_input_dims(tmp_path, "batch4.onnx", d0=4), labels=_ten_labels())
    dynamic = Classifier(_with_input_dims(tmp_path, "dynamic.onnx"), labels=_ten_labels())
    for crops in (1, 10):
        np.testing.assert_allclose(
            batch4.probabilities([CAT, EXAMPLES / "coffee.jpg"], crops=crops),
            dynamic.probabilities([CAT, EXAMPLES / "coffee.jpg"], crops=crops),
            rtol=1e-5,
            atol=1e-7,
        )


def test_inputs_klaus_cannot_feed_are_one_clear_error(tmp_path):
    rect = _with_input_dims(tmp_path, "rect.onnx", d3=48)
    with pytest.raises(
        KlausModelError,
        match=f"^{rect}: input 'input' has shape \\(\\?, 3, 32, 48\\), but the preprocessing "
        "makes \\(N, 3, 224, 224\\)$",
    ):
        Classifier(rect, labels=_ten_labels())
    huge = _with_input_dims(tmp_path, "huge.onnx", d2=5000, d3=5000)
    with pytest.raises(
        KlausModelError, match=f"^{huge}: the graph takes 5000x5000 inputs, more than the 4096-pixel limit$"
    ):
        Classifier(huge, labels=_ten_labels())


def test_finite_probabilities_names_the_image_the_model_fails_on(tmp_path):
    clf = Classifier(tiny_klaus())
    np.testing.assert_array_equal(clf.finite_probabilities([CAT]), clf.probabilities([CAT]))
    clf.run = lambda batch: np.full((batch.shape[0], TINY_CLASSES), np.nan, np.float32)
    with pytest.raises(KlausModelError, match=f"^{CAT}: the model tiny gives NaN or infinite scores for this image$"):
        clf.finite_probabilities([CAT, EXAMPLES / "coffee.jpg"])


def test_classifying_with_a_klaus_model_imports_neither_onnx_nor_the_compression_code():
    """The classify path needs numpy, ONNX Runtime and Pillow only: `onnx` (with ml_dtypes),
    torch, the compression modules and the CLI's click and tqdm stay unimported."""
    probe = (
        "import sys\n"
        "from klaus.runtime import Classifier\n"
        "result = Classifier().classify(sys.argv[1])\n"
        "heavy = ('onnx', 'ml_dtypes', 'torch', 'click', 'tqdm', 'klaus.compression', 'klaus.onnxgraph', 'klaus.sweep',"
        " 'klaus.evaluate', 'klaus.lowmem')\n"
        "print(result.predictions[0].label)\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(CAT)], capture_output=True, text=True, check=True).stdout
    label, imported = out.splitlines()[0], out.splitlines()[1:]
    assert label == "tiger cat"
    assert imported == [""]


def test_a_background_classifier_waits_for_its_session_where_it_is_first_needed(tmp_path, monkeypatch):
    """With ``background`` the session may still be building when the classifier is returned; a model ONNX
    Runtime cannot load is refused at first use (each time), where without it the constructor refuses it."""
    model = tiny_klaus()
    good = tmp_path / "good.klaus"
    compression.write(model, good)
    ready = Classifier(str(good))
    later = Classifier(str(good), background=True)
    assert later.ready() is later
    np.testing.assert_array_equal(later.probabilities([CAT]), ready.probabilities([CAT]))
    nope = tmp_path / "nope.klaus"
    compression.write(dataclasses.replace(model, graph=model.graph.replace(b"Relu", b"Nope")), nope)
    monkeypatch.setenv("KLAUS_TRUST_MODEL", "1")
    cannot = f"^{nope}: ONNX Runtime cannot load the model"
    with pytest.raises(KlausModelError, match=cannot):
        Classifier(str(nope))
    clf = Classifier(str(nope), background=True)
    for _ in range(2):
        with pytest.raises(KlausModelError, match=cannot):
            clf.classify(CAT)
