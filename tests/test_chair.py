"""CHAIR-style hallucination of descriptions (m3po_core/evaluation/chair.py) and its paired intervals."""
import pytest

from m3po_core.data import synthetic
from m3po_core.data import synthetic_prompts
from m3po_core.data.synthetic_benchmarks import chair_prompts
from m3po_core.evaluation import chair, paired


def _answers(predictions, scenes):
    return [{"question_id": q["question_id"], "category": q["category"], "instruction": q["instruction"],
             "answer": q["answer"], "prediction": p} for q, p in zip(chair_prompts(scenes), predictions)]


def test_chair_counts_invented_objects_per_description_and_per_object():
    scenes = [synthetic.Scene("a", (synthetic.SceneObject("circle", "red", "top left"),
                                    synthetic.SceneObject("square", "blue", "top right"))),
              synthetic.Scene("b", (synthetic.SceneObject("triangle", "green", "bottom left"),))]
    got = chair.score(_answers([
        "there are three shapes , a red circle at the top left , a blue square at the top right and a yellow "
        "triangle at the bottom left .",                       # one invented of three named
        "there is one shape , a green triangle at the top right ."], scenes))  # right object, wrong place
    assert got["chair_s"] == 0.5 and got["chair_i"] == pytest.approx(1 / 4)
    assert got["recall"] == 1.0 and got["n"] == 2 and got["objects_named"] == 2.0
    nothing = chair.score(_answers(["", "no shapes ."], scenes))
    assert nothing == {"chair_s": 0.0, "chair_i": 0.0, "recall": 0.0, "n": 2, "objects_named": 0.0}


def test_a_model_that_invents_less_gets_an_interval_below_zero_and_is_better():
    scenes = synthetic.make_scenes(0, "eval", 150, synthetic.WorldBias(0.7, 0.0))
    truth = [q["answer"] for q in chair_prompts(scenes)]
    invents = [synthetic_prompts.open_reference(s, "describe_detail", synthetic.seeded_rng(1, s.scene_id),
                                        synthetic.WorldBias(0.7, 1.0)) for s in scenes]
    base, trained = _answers(invents, scenes), _answers(truth, scenes)
    ci = paired.intervals("chair", base, trained, seed=0)
    assert ci["chair_s"]["high"] < 0 and ci["chair_i"]["high"] < 0
    assert paired.better(ci["chair_s"], "chair_s") and not paired.better(ci["chair_s"])
    assert ci["recall"]["delta"] == 0  # both name every object there
    same = paired.intervals("chair", base, base, seed=0)
    assert not paired.better(same["chair_i"], "chair_i")
