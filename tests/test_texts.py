"""Spec §3 text composition and the normal/abnormal rule."""
import json
from pathlib import Path

import pytest

from data.texts import compose_anatomy_text, is_abnormal, normal_template, text_for_encoding, text_hash

SAMPLE = Path(__file__).resolve().parent / "data" / "ctrate_anatomy_texts_sample.json"


def test_template():
    assert normal_template("heart") == "heart shows no significant abnormalities."


def test_compose_conc_and_desc():
    conc = {"s_a": {"lung": 'Nodule (5 mm) in the "left" lung', "heart": "Cardiomegaly."}}
    desc = {"s_a": {"lung": "A nodule is seen", "aorta": "Aorta's diameter is normal."}}
    assert compose_anatomy_text("s_a", "lung", desc, conc) == "Nodule 5 mm in the left lung.A nodule is seen."
    assert compose_anatomy_text("s_a", "heart", desc, conc) == "Cardiomegaly."
    assert compose_anatomy_text("s_a", "aorta", desc, conc) == (
        "aorta shows no significant abnormalities.Aortas diameter is normal.")
    assert compose_anatomy_text("s_a", "esophagus", desc, conc) == normal_template("esophagus")
    assert compose_anatomy_text("missing", "lung", desc, conc) == normal_template("lung")


def test_question_mark_gets_period():
    conc = {"s": {"lung": "infection process?"}}
    assert compose_anatomy_text("s", "lung", {}, conc) == "infection process?."


def test_abnormal_rule():
    assert not is_abnormal(normal_template("heart"), "heart")
    assert not is_abnormal(normal_template("heart") + "Heart size is normal.", "heart")
    assert is_abnormal("Cardiomegaly.", "heart")
    assert is_abnormal(normal_template("lung"), "heart")


def test_text_for_encoding():
    t = normal_template("aorta")
    assert text_for_encoding(t, "aorta") == t
    assert text_for_encoding(t + "Calcific plaques.", "aorta") == "Calcific plaques."
    assert text_for_encoding("Cardiomegaly.", "heart") == "Cardiomegaly."


def test_text_hash_pinned():
    # literal values: the hash must agree across processes, ranks and releases (Python's hash is salted)
    assert text_hash("abc") == 6455300059550759896
    assert text_hash("abd") == 1518837652572122583
    assert text_hash("Aorta is normal.") == 6630887903649572963
    assert text_hash("") == -5426141060434712860  # signed 64-bit


@pytest.mark.skipif(not SAMPLE.is_file(), reason="reference sample not available")
def test_reference_sample_rule():
    """Release-composed texts: heart/esophagus/aorta mostly start with the template."""
    sample = json.loads(SAMPLE.read_text())
    assert len(sample) == 100
    counts = {}
    for scan, anatomies in sample.items():
        for anatomy, text in anatomies.items():
            # re-composing a composed text as a conclusion is the identity (period + no quotes)
            assert compose_anatomy_text(scan, anatomy, {}, {scan: {anatomy: text}}) == text
            normal = not is_abnormal(text, anatomy)
            assert normal == text.startswith(f"{anatomy} shows no significant abnormalities.")
            counts[(anatomy, normal)] = counts.get((anatomy, normal), 0) + 1
    assert counts[("heart", True)] == 91 and counts[("heart", False)] == 9
    assert counts[("lung", False)] == 78
    assert counts[("esophagus", True)] == 99
    assert counts[("aorta", False)] == 18
    heart = sample["train_1_a"]["heart"]
    assert not is_abnormal(heart, "heart")
    assert text_for_encoding(heart, "heart").startswith("Heart contour")
