"""The VQA adapter on a random-weight default-family model: the target's gradient, batching,
counterfactual and contrast maps, errors."""
import pytest
import torch
from PIL import Image

import mmgradcam as mg
from mmgradcam.data.shapes import make_image
from mmgradcam.tasks import vqa
from tiny import tiny_vqa as tiny

QUESTION_WORDS = "what color is the circle square star shape object how many circles are there a red blue ?".split()
ANSWERS = ["blue", "circle", "no", "one", "red", "square", "two", "yes"]


@pytest.fixture(scope="module")
def tiny_vqa(tmp_path_factory):
    return vqa.load(str(tiny(tmp_path_factory.mktemp("tiny_vqa"), QUESTION_WORDS, ANSWERS, max_question=10)))


@pytest.fixture(scope="module")
def image():
    pixels, _, _ = make_image(3, seed=9, size=80)
    return Image.fromarray(pixels[:, :72])


def test_answer_ranks_and_probabilities(tiny_vqa, image):
    top = tiny_vqa.answer(image, "what color is the circle ?", top_k=3)
    assert len(top) == 3 and [p for _, p in top] == sorted([p for _, p in top], reverse=True)
    full = tiny_vqa.answer(image, "what color is the circle ?", top_k=100)
    assert abs(sum(p for _, p in full) - 1.0) < 1e-5
    result = tiny_vqa.explain(image, "what color is the circle ?")
    assert result.answer == top[0][0] and abs(result.probabilities[0] - top[0][1]) < 1e-6
    assert result.map.shape == (80, 72) and result.layer_maps.shape == (1, 8, 8)


def test_map_gradient_is_the_answer_scores_finite_difference(tiny_vqa, image):
    """The engine's gradient at the layer equals a central finite difference of the answer logit."""
    model = tiny_vqa.model.double()
    try:
        inputs, _ = tiny_vqa.prepare(image, "how many circles are there ?")
        inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
        target = tiny_vqa.answer_target("two")
        exp = mg.explain(model, inputs, [target], tiny_vqa.default_layer)
        layer = model.get_submodule(tiny_vqa.default_layer)
        direction = torch.randn_like(exp.activations, dtype=torch.float64)

        def score_with(offset):
            handle = layer.register_forward_hook(lambda m, i, o: o + offset)
            try:
                with torch.no_grad():
                    return float(target(model(**inputs)))
            finally:
                handle.remove()

        eps = 1e-5
        numeric = (score_with(eps * direction) - score_with(-eps * direction)) / (2 * eps)
        analytic = float((exp.gradients[0].double() * direction).sum())
        assert abs(numeric - analytic) <= 1e-4 * max(1.0, abs(analytic))
        assert float(exp.scores[0, 0]) == pytest.approx(score_with(0.0), rel=1e-6)
    finally:
        model.float()


def test_several_answers_batched_equal_one_at_a_time(tiny_vqa, image):
    question = "what color is the circle ?"
    together = tiny_vqa.explain(image, question, answer=["red", "blue", "yes"])
    for k, answer in enumerate(["red", "blue", "yes"]):
        alone = tiny_vqa.explain(image, question, answer=answer)
        torch.testing.assert_close(together.maps[k], alone.map, rtol=1e-5, atol=1e-6)
        assert together.scores[k] == pytest.approx(alone.score, rel=1e-6)
    logprob = tiny_vqa.explain(image, question, answer="red", score="logprob")
    assert logprob.score == pytest.approx(torch.log(torch.tensor(together.probabilities[0])).item(), abs=1e-5)


def test_counterfactual_is_relu_of_negated_weights(tiny_vqa, image):
    question = "what color is the circle ?"
    inputs, _ = tiny_vqa.prepare(image, question)
    exp = mg.explain(tiny_vqa.model, inputs, [tiny_vqa.answer_target("red")], tiny_vqa.default_layer)
    alpha = exp.gradients[0, 0].mean(dim=(1, 2))  # Grad-CAM weights
    expected = (-(alpha[:, None, None] * exp.activations[0]).sum(0)).clamp(min=0)
    why_not = tiny_vqa.explain(image, question, answer="red", counterfactual=True)
    torch.testing.assert_close(why_not.layer_maps[0], expected, rtol=1e-5, atol=1e-6)
    assert why_not.counterfactual


def test_contrast_map_is_gradcam_of_the_score_difference(tiny_vqa, image):
    question = "what color is the circle ?"
    inputs, geometry = tiny_vqa.prepare(image, question)
    result = tiny_vqa.explain(image, question, answer="red", contrast="blue")
    exp = mg.explain(tiny_vqa.model, inputs, [tiny_vqa.answer_target("red"), tiny_vqa.answer_target("blue")],
                     tiny_vqa.default_layer)
    signed = exp.signed_layer_maps[0, 0] - exp.signed_layer_maps[1, 0]  # Grad-CAM is linear in the gradient
    expected = geometry.invert(mg.engine.upsample_maps(signed.clamp(min=0), (64, 64)))
    torch.testing.assert_close(result.contrast_map, expected, rtol=1e-5, atol=1e-6)


def test_bad_questions_and_answers(tiny_vqa, image):
    with pytest.raises(ValueError, match="'maybe' is not in the model's answer vocabulary"):
        tiny_vqa.explain(image, "what color is the circle ?", answer="maybe")
    with pytest.raises(ValueError, match="is empty"):
        tiny_vqa.explain(image, "  ?? ")
    with pytest.raises(ValueError, match="only words the model does not know: zebra, quokka"):
        tiny_vqa.explain(image, "zebra quokka ?")
    with pytest.warns(UserWarning, match="unknown words mapped to <unk>: zebra"):
        tiny_vqa.explain(image, "what color is the zebra ?")
    with pytest.raises(ValueError, match="limit is 10"):
        tiny_vqa.explain(image, "what " * 11)
    with pytest.raises(ValueError, match="score must be one of"):
        tiny_vqa.explain(image, "what color is the circle ?", score="prob")
